"""Task-vector merges: task arithmetic, TIES and DARE (and DARE-TIES) as settings of one recipe.

A *task vector* is what fine-tuning added to a pre-trained model, ``tau_i = theta_i - theta_base``. All the
methods here edit the task vectors of each floating parameter tensor, combine them, and add the result back:

    merged = base + scaling * combine(edit(tau_1), ..., edit(tau_N))

* edit: keep each vector's largest-magnitude entries (TIES "trim", ``density``) and/or drop entries at random
  and rescale the survivors by ``1 / (1 - p)`` (DARE, ``drop_rate``);
* combine: ``sum`` or ``mean``, optionally only over the entries whose sign agrees with a per-entry elected
  sign (TIES "elect" + disjoint merge, ``sign_election``).

The variants are therefore values of one :class:`TaskVectorConfig` (as mergekit does with its generalized task
arithmetic), not separate implementations:

=================  =======  ==========  =========  =============  =======
method             density  drop_rate   sign elec  combine        scaling
=================  =======  ==========  =========  =============  =======
task_arithmetic    1        0           no         sum            1/N
ties               0.2      0           yes        mean           1
dare               1        0.5         no         mean           1
dare (DARE-TIES)   1        0.5         yes        mean           1
=================  =======  ==========  =========  =============  =======

Unlike permutation-based merges these assume that every model was fine-tuned from the same ``base``, so their
units already correspond. Not part of the task vector:

* integer buffers (BatchNorm's ``num_batches_tracked``) are copied from ``base``;
* floating *buffers* — BatchNorm ``running_mean``/``running_var`` and the like — are not trained by gradients,
  so a "task vector" of them means nothing (and trimming or scaling a variance can make it wrong or negative).
  They are the plain average of the fine-tuned models. The merged weights shift the activations anyway, so
  re-estimate them on data afterwards (``torch.optim.swa_utils.update_bn`` or mergelab's BatchNorm reset).
"""

from __future__ import annotations

import copy
import logging
import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from mergelab.merge.registry import register_method
from mergelab.structure.checks import check_same_architecture

__all__ = [
    "TaskVectorConfig",
    "combine_task_vectors",
    "dare",
    "global_thresholds",
    "keep_count",
    "kth_largest",
    "merge_task_vector_tensor",
    "merge_task_vectors",
    "task_vector_recipe",
    "task_arithmetic",
    "ties",
]

log = logging.getLogger(__name__)

Combine = Literal["sum", "mean"]
Trim = Literal["per_tensor", "global"]

TASK_ARITHMETIC_PAPER = "https://arxiv.org/abs/2212.04089"  # Ilharco et al., ICLR 2023
TIES_PAPER = "https://arxiv.org/abs/2306.01708"  # Yadav et al., NeurIPS 2023
DARE_PAPER = "https://arxiv.org/abs/2311.03099"  # Yu et al., ICML 2024


@dataclass(frozen=True)
class TaskVectorConfig:
    """How to edit and combine task vectors; task arithmetic, TIES, DARE and DARE-TIES are values of it.

    Attributes:
        scaling: λ, multiplies the combined task vector before it is added to the base.
        density: fraction of each task vector's entries kept, largest magnitudes first (TIES trim); 1 keeps
            everything. See :func:`keep_count` for the rounding rule.
        trim: where the top-k is taken: ``"per_tensor"`` (each tensor keeps its own top fraction, so every layer
            keeps some change; mergekit's choice) or ``"global"`` (the paper's: one top-k over the model's whole
            flattened task vector, all floating parameters together; layers with small changes may lose all).
        drop_rate: probability p of dropping each entry of each task vector; survivors are rescaled by
            ``1 / (1 - p)`` so the expectation is unchanged (DARE); 0 drops nothing.
        sign_election: elect a sign per entry from the sum of the (edited) task vectors and combine only the
            entries that agree with it (TIES).
        combine: ``"sum"`` or ``"mean"`` of the task vectors; with ``sign_election`` the mean is the TIES
            *disjoint* mean, over the agreeing entries only.
    """

    scaling: float = 1.0
    density: float = 1.0
    drop_rate: float = 0.0
    sign_election: bool = False
    combine: Combine = "sum"
    trim: Trim = "per_tensor"

    def __post_init__(self) -> None:
        if not math.isfinite(self.scaling):
            raise ValueError(f"task vectors: scaling must be a finite number, got {self.scaling!r}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"task vectors: density must be in (0, 1], got {self.density!r}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"task vectors: drop_rate must be in [0, 1), got {self.drop_rate!r}")
        if self.combine not in ("sum", "mean"):
            raise ValueError(f"task vectors: combine must be 'sum' or 'mean', got {self.combine!r}")
        if self.trim not in ("per_tensor", "global"):
            raise ValueError(f"task vectors: trim must be 'per_tensor' or 'global', got {self.trim!r}")

    @property
    def trims(self) -> bool:
        return self.density < 1.0

    @property
    def global_trim(self) -> bool:
        return self.trims and self.trim == "global"


def keep_count(density: float, numel: int) -> int:
    """How many entries a trim to ``density`` keeps out of ``numel``: ``ceil(density · numel)``, at least 1.

    The product is rounded to 6 decimals first so that e.g. 0.2 · 10 counts as 2, not 3. The trim keeps every
    entry whose magnitude is at least the ``k``-th largest magnitude, so ties at the threshold are all kept.
    This is the TIES paper's code whenever ``density · numel`` is not an integer (it keeps entries ≥ the
    ``(numel − int(density·numel))``-th smallest, i.e. ``int(density·numel) + 1`` of them); mergekit keeps exactly
    ``int(density·numel)`` (its result can differ by the one entry at the threshold).
    """
    if numel <= 0:
        return 0
    return min(numel, max(1, math.ceil(round(density * numel, 6))))


def combine_task_vectors(
    deltas: torch.Tensor,
    config: TaskVectorConfig,
    generator: torch.Generator | None = None,
    thresholds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Edit and combine the task vectors of one tensor: trim, drop, elect signs, sum or mean, scale.

    Args:
        deltas: ``(N, *shape)`` stacked task vectors ``theta_i - theta_base`` of one tensor, floating point.
            It may be modified in place (pass a copy if you need it afterwards).
        config: the recipe.
        generator: CPU random generator for DARE's drops (drawn on the CPU so that a seed gives the same
            masks on every device); a fresh unseeded one is used if omitted.
        thresholds: ``(N,)`` magnitudes for ``trim="global"``: model ``i`` keeps the entries with
            ``|delta| >= thresholds[i]`` (see :func:`global_thresholds`).

    Returns:
        ``scaling * combined`` with shape ``shape``; add it to the base tensor.

    Example:
        >>> import torch
        >>> d = torch.tensor([[3.0], [-1.0], [-1.0]])  # three models, one entry; mass elects "+"
        >>> combine_task_vectors(d, TaskVectorConfig(sign_election=True, combine="mean"))
        tensor([3.])
    """
    n = deltas.shape[0]
    if config.trims:
        if config.trim == "global":
            if thresholds is None:
                raise ValueError("task vectors: trim='global' needs thresholds= (see global_thresholds)")
            deltas = _trim_at(deltas, thresholds)
        else:
            deltas = _trim(deltas, config.density)
    if config.drop_rate > 0.0:
        keep = torch.rand(deltas.shape, generator=generator) >= config.drop_rate  # (N, *shape)
        deltas = deltas * keep.to(deltas.device) / (1.0 - config.drop_rate)
    if config.sign_election:
        # TIES elects by mass (sign of the sum), not by a head count; a zero sum counts as "+".
        elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)  # (*shape)
        # 1 where an entry is non-zero with the elected sign (trimmed/dropped zeros never agree), else 0
        agree = (deltas * elected > 0).to(deltas.dtype)  # (N, *shape)
        combined = deltas.mul_(agree).sum(dim=0)
        if config.combine == "mean":
            combined.div_(agree.sum(dim=0).clamp_(min=1))
    else:
        combined = deltas.sum(dim=0)
        if config.combine == "mean":
            combined.div_(n)
    return combined.mul_(config.scaling)  # combined is always a fresh tensor here


def _trim(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """Per row, keep the entries at least as large in magnitude as the row's ``keep_count``-th largest."""
    n = deltas.shape[0]
    flat = deltas.reshape(n, -1)  # (N, numel)
    numel = flat.shape[1]
    k = keep_count(density, numel)
    if k >= numel or numel == 0:
        return deltas
    mag = flat.abs()  # (N, numel)
    thr = kth_largest(mag, k).unsqueeze(1)  # (N, 1)
    return deltas.masked_fill_((mag < thr).reshape(deltas.shape), 0.0)


def kth_largest(mags: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the exact ``k``-th largest of non-negative ``mags`` (N, n) — the value ``kthvalue`` gives.

    Large float32/float64 rows use a radix step: non-negative floats order like their bit patterns, so a
    histogram of the top 16 bits finds the bin holding the k-th largest, and ``kthvalue`` runs on that bin only
    (several times faster than ``kthvalue`` on the whole row).
    """
    n = mags.shape[1]
    bits = {torch.float32: (torch.int32, 16), torch.float64: (torch.int64, 48)}.get(mags.dtype)
    if n < 1 << 16 or bits is None:
        return mags.kthvalue(n - k + 1, dim=1).values
    ibits, shift = bits
    top = mags.contiguous().view(ibits) >> shift  # (N, n) in [0, 2^16)
    out = torch.empty(mags.shape[0], dtype=mags.dtype)
    for i in range(mags.shape[0]):
        hist = torch.bincount(top[i], minlength=1 << 16)
        above = hist.flip(0).cumsum(0)  # entries in this bin or higher, from the top
        idx = int((above >= k).int().argmax())
        b = (1 << 16) - 1 - idx
        rank = k - (int(above[idx]) - int(hist[b]))  # rank inside the bin, from its top
        vals = mags[i][top[i] == b]
        out[i] = vals.kthvalue(vals.numel() - rank + 1).values
    return out


def _trim_at(deltas: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    thr = thresholds.to(deltas.dtype).reshape(-1, *([1] * (deltas.dim() - 1)))  # (N, 1, ...)
    return deltas.masked_fill_(deltas.abs() < thr, 0.0)


def task_vector_seed(seed: int, name: str) -> int:
    """The seed of one tensor's DARE drops: a function of the merge seed and the tensor name only, so the drops
    do not depend on the order in which tensors are visited (in memory or streamed from disk)."""
    return (int(seed) * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63)


def merge_task_vector_tensor(
    name: str,
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    config: TaskVectorConfig,
    *,
    statistic: bool = False,
    seed: int = 0,
    thresholds: torch.Tensor | None = None,
) -> torch.Tensor:
    """One tensor of a task-vector merge (what :func:`merge_task_vectors` does for each ``state_dict`` entry).

    Args:
        name: the tensor's name (seeds DARE's drops with ``seed``).
        base: the base model's tensor.
        tensors: the fine-tuned models' tensors, same shape.
        config: the recipe.
        statistic: a floating buffer (BatchNorm running statistics): the plain average of ``tensors``.
        seed: the merge seed.
        thresholds: per-model magnitudes for ``trim="global"``.

    Returns:
        The merged tensor, in ``base``'s dtype; integer tensors are copied from ``base``.
    """
    if not base.is_floating_point():
        return base.clone()
    work = torch.promote_types(base.dtype, torch.float32)
    if statistic:  # a statistic, not a trained weight: average it (see module docstring)
        return torch.stack([t.to(work) for t in tensors]).mean(dim=0).to(base.dtype)
    b = base.detach().to(work)
    deltas = torch.empty((len(tensors), *b.shape), dtype=work, device=b.device)  # (N, *shape)
    for i, t in enumerate(tensors):
        torch.sub(t.detach().to(device=b.device, dtype=work), b, out=deltas[i])
    generator = torch.Generator().manual_seed(task_vector_seed(seed, name)) if config.drop_rate > 0 else None
    return combine_task_vectors(deltas, config, generator, thresholds).add_(b).to(base.dtype)  # (*shape)


def global_thresholds(deltas_per_tensor: Iterable[torch.Tensor], density: float) -> torch.Tensor:
    """Per model, the ``keep_count``-th largest magnitude over all of its task vector's entries (global trim).

    Args:
        deltas_per_tensor: ``(N, *shape_t)`` task vectors of each floating parameter tensor ``t``.
        density: the fraction to keep.

    Returns:
        ``(N,)`` thresholds in float32 (float64 if any tensor is).
    """
    mags = [d.reshape(d.shape[0], -1).abs() for d in deltas_per_tensor]
    if not mags:
        raise ValueError("task vectors: trim='global' found no floating parameters")
    flat = torch.cat([m.to(torch.promote_types(m.dtype, mags[0].dtype)) for m in mags], dim=1)  # (N, total)
    return kth_largest(flat, keep_count(density, flat.shape[1]))  # (N,)


def merge_task_vectors(
    models: Sequence[nn.Module],
    base: nn.Module | None,
    config: TaskVectorConfig,
    *,
    seed: int = 0,
    op: str = "task_vectors",
) -> nn.Module:
    """Merge fine-tunes of ``base`` by editing and combining their task vectors, tensor by tensor.

    Floating parameters get ``base + combine_task_vectors(...)``; floating buffers (BatchNorm running
    statistics) are the plain average of ``models``; integer buffers come from ``base``. Arithmetic runs in at
    least float32 and the result is cast back to the base's dtype.

    Args:
        models: the fine-tuned models (one or more), all of ``base``'s architecture.
        base: the pre-trained model they were all fine-tuned from.
        config: the recipe (see :class:`TaskVectorConfig`).
        seed: seeds DARE's random drops; the same seed gives the same merge.
        op: the method name used in error messages.

    Returns:
        A new model (a copy of ``base`` with merged weights); the inputs are never modified.

    Example:
        >>> import copy, torch
        >>> from torch import nn
        >>> base = nn.Linear(4, 2)
        >>> ft = copy.deepcopy(base)
        >>> with torch.no_grad():
        ...     _ = ft.weight.add_(1.0)
        >>> m = merge_task_vectors([ft], base, TaskVectorConfig(scaling=0.5))
        >>> torch.allclose(m.weight, base.weight + 0.5)
        True
    """
    if base is None:
        raise ValueError(
            f"{op}: needs base= (the pre-trained model every model was fine-tuned from); "
            "task vectors are measured from it"
        )
    if not isinstance(base, nn.Module):
        raise TypeError(f"{op}: base must be an nn.Module, got {type(base).__name__}")
    models = list(models)
    if not models:
        raise ValueError(f"{op}: got no models")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{op}: models[{i}] must be an nn.Module, got {type(m).__name__}")
    check_same_architecture([base, *models], f"{op} (model 0 is base, model i is models[i-1])")

    param_names = {name for name, _ in base.named_parameters(remove_duplicate=False)}
    base_sd = base.state_dict()
    sds = [m.state_dict() for m in models]
    thresholds = None
    if config.global_trim:
        trimmed = [k for k, v in base_sd.items() if k in param_names and v.is_floating_point()]
        thresholds = global_thresholds(
            (
                torch.stack(
                    [sd[k].detach().to(torch.promote_types(base_sd[k].dtype, torch.float32)) for sd in sds]
                )
                - base_sd[k].detach().to(torch.promote_types(base_sd[k].dtype, torch.float32))
                for k in trimmed
            ),
            config.density,
        )
    out = {
        name: merge_task_vector_tensor(
            name,
            b,
            [sd[name] for sd in sds],
            config,
            statistic=name not in param_names,
            seed=seed,
            thresholds=thresholds,
        )
        for name, b in base_sd.items()
    }
    merged = copy.deepcopy(base)
    merged.load_state_dict(out)
    log.debug("%s: merged %d models into base with %s", op, len(models), config)
    return merged


@register_method("task_arithmetic", paper=TASK_ARITHMETIC_PAPER)
def task_arithmetic(
    models: Sequence[nn.Module],
    *,
    data: object = None,
    base: nn.Module | None = None,
    scaling: float | None = None,
) -> nn.Module:
    """Task arithmetic: base + λ·Σ (θ_i − θ_base) over the fine-tunes of one base (Ilharco et al. 2023).

    Args:
        models: models fine-tuned from ``base``.
        data: unused.
        base: the pre-trained model (required).
        scaling: λ. Default ``1/N``, which makes the merge the uniform average of the fine-tunes — a safe
            choice without validation data. The paper picks λ on held-out data from [0, 1] (FusionBench uses
            0.3 for eight tasks); larger λ adds more of each task at the price of interference.

    Returns:
        A new model.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mergelab.merge import merge
        >>> base, a, b = nn.Linear(4, 2), nn.Linear(4, 2), nn.Linear(4, 2)
        >>> m = merge([a, b], method="task_arithmetic", base=base, scaling=0.5)
        >>> torch.allclose(m.weight, (a.weight + b.weight) / 2)
        True
    """
    del data
    config, _ = task_vector_recipe("task_arithmetic", len(models), scaling=scaling)
    return merge_task_vectors(models, base, config, op="task_arithmetic")


@register_method("ties", paper=TIES_PAPER)
def ties(
    models: Sequence[nn.Module],
    *,
    data: object = None,
    base: nn.Module | None = None,
    scaling: float = 1.0,
    density: float = 0.2,
    trim: Trim = "per_tensor",
) -> nn.Module:
    """TIES: trim task vectors to their top entries, elect signs by mass, disjoint mean (Yadav et al. 2023).

    Args:
        models: models fine-tuned from ``base``.
        data: unused.
        base: the pre-trained model (required).
        scaling: λ; the paper's default without validation data is 1 (the disjoint mean already has the
            scale of one task vector).
        density: fraction of entries of each task vector kept (the paper's top-k%, default k = 20); the count
            is ``ceil(density · n)`` with ties at the threshold kept (see :func:`keep_count`).
        trim: ``"per_tensor"`` (default: each tensor keeps its top fraction, every layer stays alive, as in
            mergekit) or ``"global"`` (the paper: one top-k over the whole flattened task vector).

    Returns:
        A new model.

    Note:
        An entry whose kept values sum to exactly zero elects "+"; trimmed entries never vote.

    Example:
        >>> from torch import nn
        >>> from mergelab.merge import merge
        >>> base, a, b = nn.Linear(4, 2), nn.Linear(4, 2), nn.Linear(4, 2)
        >>> m = merge([a, b], method="ties", base=base, density=0.5)
    """
    del data
    config, _ = task_vector_recipe("ties", len(models), scaling=scaling, density=density, trim=trim)
    return merge_task_vectors(models, base, config, op="ties")


@register_method("dare", paper=DARE_PAPER)
def dare(
    models: Sequence[nn.Module],
    *,
    data: object = None,
    base: nn.Module | None = None,
    scaling: float = 1.0,
    drop_rate: float = 0.5,
    combine: Combine = "mean",
    sign_election: bool = False,
    seed: int = 0,
) -> nn.Module:
    """DARE: drop task-vector entries at random, rescale survivors by 1/(1−p), then combine (Yu et al. 2024).

    Args:
        models: models fine-tuned from ``base``.
        data: unused.
        base: the pre-trained model (required).
        scaling: λ.
        drop_rate: p, the probability of dropping each entry. The paper drops 90% or more of LLM fine-tuning
            deltas, which are tiny; the default 0.5 is milder because small models fine-tuned for long move
            further, and the paper reports that DARE breaks down when deltas are large.
        combine: ``"mean"`` (default: with λ = 1 the expected merge is the uniform average of the fine-tunes)
            or ``"sum"`` (the paper's DARE + task arithmetic; then choose λ as for task arithmetic).
        sign_election: TIES-style sign election and disjoint combination after the drop (DARE-TIES).
        seed: seeds the random drops; the same seed gives the same merge.

    Returns:
        A new model.

    Example:
        >>> from torch import nn
        >>> from mergelab.merge import merge
        >>> base, a, b = nn.Linear(4, 2), nn.Linear(4, 2), nn.Linear(4, 2)
        >>> m = merge([a, b], method="dare", base=base, drop_rate=0.3, sign_election=True, seed=1)
    """
    del data
    config, seed = task_vector_recipe(
        "dare",
        len(models),
        scaling=scaling,
        drop_rate=drop_rate,
        combine=combine,
        sign_election=sign_election,
        seed=seed,
    )
    return merge_task_vectors(models, base, config, seed=seed, op="dare")


_DEFAULTS: dict[str, dict[str, Any]] = {
    "task_arithmetic": {"scaling": None},
    "ties": {"scaling": 1.0, "density": 0.2, "trim": "per_tensor"},
    "dare": {"scaling": 1.0, "drop_rate": 0.5, "combine": "mean", "sign_election": False, "seed": 0},
}


def task_vector_recipe(method: str, n_models: int, **options: Any) -> tuple[TaskVectorConfig, int]:
    """The :class:`TaskVectorConfig` and seed of a registered method with its options (defaults filled in).

    One place maps method options to recipes, so the in-memory methods and the streamed checkpoint merge
    (:mod:`mergelab.merge.streamed`) cannot drift apart.

    Raises:
        TypeError: an option the method does not take.
    """
    if method not in _DEFAULTS:
        raise ValueError(f"task vectors: unknown method {method!r}; choose one of {sorted(_DEFAULTS)}")
    unknown = sorted(set(options) - set(_DEFAULTS[method]))
    if unknown:
        raise TypeError(f"{method}: unknown option(s) {unknown}; valid options: {sorted(_DEFAULTS[method])}")
    o = {**_DEFAULTS[method], **{k: v for k, v in options.items() if v is not None}}
    if method == "task_arithmetic":
        lam = 1.0 / n_models if o["scaling"] is None else float(o["scaling"])
        return TaskVectorConfig(scaling=lam), 0
    if method == "ties":
        config = TaskVectorConfig(
            scaling=float(o["scaling"]),
            density=float(o["density"]),
            sign_election=True,
            combine="mean",
            trim=o["trim"],
        )
        return config, 0
    config = TaskVectorConfig(
        scaling=float(o["scaling"]),
        drop_rate=float(o["drop_rate"]),
        sign_election=bool(o["sign_election"]),
        combine=o["combine"],
    )
    return config, int(o["seed"])
