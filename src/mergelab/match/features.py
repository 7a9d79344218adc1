"""Streamed per-group activation statistics for several models at once.

For every group, the units of all models are concatenated — model 0's ``n`` units, then model 1's, … — and the
first and second moments of that joint feature vector are accumulated batch by batch: a sum (N·n) and a raw
moment matrix (N·n × N·n), in float64. Nothing holds a dataset's activations; one batch's features of the models
are alive at a time. From the sums come means, the joint covariance (ZipIt needs the full joint matrix, within
and across models) and correlations.

Where the units are read:

* ``Group.probes``: where discovery saw the units — a module's input or output (``site="input"``/``"output"``,
  read with forward hooks on the eager model, so any model that runs works, Hugging Face transformers included),
  or an fx node of :func:`trace_model` ``(model)`` (``site="node"``, hand-written structures); units along
  ``probe.dim``. The samples of all probes of a group are pooled (e.g. every point of a residual stream).
* no probes (:func:`fallback_taps`; structure discovery leaves the query/key and value groups of attention
  leaves and the parts of a split basis without probes): a forward hook on the last module (in
  ``named_modules`` order, which follows the forward pass for the zoo) whose output *is* the group's units,
  i.e. which produces them with an ``"out"`` axis on dim 0 of its own weight or bias:

  - ``Linear``, ``Conv*d``, ``BatchNorm``/``InstanceNorm``/``GroupNorm`` and 1-d ``LayerNorm``: the output,
    units along dim 1 (maps) or the last dim (``Linear``, ``LayerNorm``); a part of a split basis (``Axis.start``)
    reads its slice ``[start, start + size)`` of that dim;
  - ``nn.MultiheadAttention`` (packed ``in_proj_weight`` or separate ``q/k/v_proj_weight``): the q, k or v
    projection of the module's query / key / value input, recomputed in the hook from the projection rows of
    the group (its output is ``out_proj``'s, in the residual basis, and a tuple); its ``out_proj`` (never
    called as a module) is read as the module's first output.

  Anything else raises ``ValueError`` naming the group: add probes to the structure.

Every other dimension is a sample: each spatial position of a conv map and each token counts.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from mergelab.evaluation import batches, eval_mode
from mergelab.structure.types import Axis, Group, Probe, Structure

__all__ = ["FeatureStats", "Tap", "collect_features", "fallback_taps", "trace_model", "unit_dim"]

logger = logging.getLogger(__name__)

# A variance below this fraction of the unit's mean square is treated as zero (a dead or constant unit):
# E[x²] - E[x]² cancels to round-off there, and dividing by it would give spurious correlations.
_REL_VAR_EPS = 1e-10


def trace_model(model: nn.Module) -> fx.GraphModule:
    """``torch.fx`` trace of ``model`` with attention modules as leaves; probes name nodes of this graph.

    This is :func:`mergelab.structure.trace` (the graph structure discovery names its probes in). The returned
    ``GraphModule`` shares the model's submodules and parameters.

    Raises:
        ValueError: if the model cannot be traced.
    """
    from mergelab.structure.discover import trace

    return trace(model)


def unit_dim(module: nn.Module) -> int:
    """The dimension of a module's output that indexes its units (channels / features)."""
    if isinstance(module, (nn.Linear, nn.LayerNorm, nn.Embedding, nn.Bilinear)):
        return -1
    return 1


@dataclass(frozen=True)
class Tap:
    """Where a group without probes is observed: a forward hook on ``module`` (see the module docstring).

    Attributes:
        module: the hooked module's name.
        dim: the unit dimension of the tapped tensor.
        start: for outputs, the group's first unit along ``dim`` (a part of a split basis).
        source: ``"output"`` (the module's output, or its first element for attention) or the attention input
            whose projection carries the units: ``"query"``, ``"key"`` or ``"value"``.
        weight: for projections, the ``state_dict`` key of the projection matrix; its rows ``[row, row + size)``.
        bias: for projections, the bias key (entries ``[bias_row, bias_row + size)``), or ``None``.
    """

    module: str
    dim: int
    start: int = 0
    source: str = "output"
    weight: str | None = None
    row: int = 0
    bias: str | None = None
    bias_row: int = 0


_OUTPUT_MODULES = (
    nn.Linear,
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
)
_MHA_PROJECTIONS = {"in_proj_weight": None, "q_proj_weight": 0, "k_proj_weight": 1, "v_proj_weight": 2}
_MHA_INPUTS = ("query", "key", "value")


def _tap_for_axis(model: nn.Module, modules: dict[str, nn.Module], group: Group, axis: Axis) -> Tap | None:
    """The tap an ``"out"`` axis offers, if its module's output (or attention projection) carries the units."""
    if axis.role != "out" or axis.dim != 0 or axis.inner != 1 or "." not in axis.param:
        return None
    path, attr = axis.param.rsplit(".", 1)
    mod = modules.get(path)
    if isinstance(mod, nn.MultiheadAttention):
        if attr not in _MHA_PROJECTIONS:
            return None  # in_proj_bias: the weight's axis gives the same tap
        e = mod.embed_dim
        idx = axis.start // e if attr == "in_proj_weight" else _MHA_PROJECTIONS[attr]
        local = axis.start - idx * e if attr == "in_proj_weight" else axis.start
        if local + group.size > e:
            return None
        bias = f"{path}.in_proj_bias" if mod.in_proj_bias is not None else None
        return Tap(path, -1, 0, _MHA_INPUTS[idx], axis.param, axis.start, bias, idx * e + local)
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    if path.endswith("out_proj") and isinstance(modules.get(parent), nn.MultiheadAttention):
        return Tap(parent, -1, axis.start)  # out_proj is applied functionally inside the attention module
    if not isinstance(mod, _OUTPUT_MODULES) or attr not in ("weight", "bias"):
        return None
    if isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) != 1:
        return None
    return Tap(path, unit_dim(mod), axis.start)


def fallback_taps(model: nn.Module, group: Group) -> Tap:
    """Where to observe ``group``'s units when it has no probes (see the module docstring).

    Raises:
        ValueError: naming the group, when no module's output or attention projection carries its units.
    """
    modules = dict(model.named_modules())
    order = {name: i for i, name in enumerate(modules)}
    best: tuple[int, Tap] | None = None
    for a in group.axes:
        tap = _tap_for_axis(model, modules, group, a)
        if tap is not None and (best is None or order[tap.module] >= best[0]):
            best = (order[tap.module], tap)
    if best is None:
        raise ValueError(
            f"collect_features: group {group.name!r} has no probes, and no module output shows its units (its "
            f"'out' axes {[str(a) for a in group.axes if a.role == 'out']} are not rows of a Linear, Conv, norm or "
            f"attention projection); add probes (fx nodes carrying its units) to the structure"
        )
    return best[1]


def fallback_module(model: nn.Module, group: Group) -> str:
    """Name of the module hooked to observe ``group``'s units when it has no probes (:func:`fallback_taps`)."""
    return fallback_taps(model, group).module


def _tap_hook(
    tap: Tap, size: int, params: dict[str, Tensor], cb: Callable[[Tensor], None]
) -> Callable[..., None]:
    """A ``with_kwargs`` forward hook feeding ``cb`` the tensor that carries the ``size`` units of ``tap``."""

    def hook(_m: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
        if tap.source != "output":
            i = _MHA_INPUTS.index(tap.source)
            x = args[i] if len(args) > i else kwargs[tap.source]
            assert tap.weight is not None
            w = params[tap.weight][tap.row : tap.row + size]
            b = params[tap.bias][tap.bias_row : tap.bias_row + size] if tap.bias else None
            cb(F.linear(x, w, b))  # (..., size): the group's q, k or v units
            return
        t = out[0] if isinstance(out, tuple) else out
        if isinstance(t, Tensor) and t.dim() > 0 and t.shape[tap.dim] != size:  # a part of a split basis
            if t.shape[tap.dim] < tap.start + size:
                raise ValueError(
                    f"collect_features: module {tap.module!r} output {tuple(t.shape)} has no units "
                    f"[{tap.start}, {tap.start + size}) along dim {tap.dim}"
                )
            t = t.narrow(tap.dim, tap.start, size)
        cb(t)  # type: ignore[arg-type]

    return hook


def _probe_hook(probe: Probe, size: int, cb: Callable[[Tensor], None]) -> Callable[..., None]:
    """A ``with_kwargs`` hook (pre-hook for inputs) feeding ``cb`` the probe's units as (samples, size)."""
    where = f"module {probe.node!r} {probe.site}"

    def take(t: object) -> None:
        if isinstance(t, tuple):
            t = t[0]
        if not isinstance(t, Tensor):
            raise TypeError(f"collect_features: {where} is {type(t).__name__}, not a tensor")
        d = probe.dim
        if t.dim() <= d or t.shape[d] < probe.start + size * probe.inner:
            raise ValueError(
                f"collect_features: {where} {tuple(t.shape)} has no {size} units of {probe.inner} entries from "
                f"entry {probe.start} along dim {d}"
            )
        t = t.detach().narrow(d, probe.start, size * probe.inner).movedim(d, -1)
        if probe.inner > 1:  # every entry of a unit is a sample of it
            t = t.reshape(-1, size, probe.inner).transpose(1, 2)
        cb(t.reshape(-1, size))

    if probe.site == "input":

        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            take(args[0] if args else next(iter(kwargs.values())))

        return pre

    def post(_m: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
        take(out)

    return post


def _flatten_units(t: Tensor, dim: int, n: int, where: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"collect_features: {where} produced {type(t).__name__}, not a tensor")
    if t.dim() == 0 or t.shape[dim] != n:
        raise ValueError(
            f"collect_features: {where} output {tuple(t.shape)} has no {n} units along dim {dim}"
        )
    return t.detach().movedim(dim, -1).reshape(-1, n)


class _Recorder(fx.Interpreter):
    """Runs a traced graph and hands the outputs of chosen nodes to callbacks."""

    def __init__(self, gm: fx.GraphModule, taps: dict[str, list[Callable[[Tensor], None]]]) -> None:
        super().__init__(gm)
        self.taps = taps

    def run_node(self, n: fx.Node) -> object:
        out = super().run_node(n)
        for fn in self.taps.get(n.name, ()):
            fn(out)
        return out


@dataclass(frozen=True)
class FeatureStats:
    """Joint first and second moments of every group's units across ``num_models`` models.

    Indices of the joint vector: model ``i``'s unit ``u`` is entry ``i*n + u`` (``n = sizes[group]``).

    Attributes:
        sizes: units per model of each group.
        num_models: how many models were observed.
        counts: samples seen per group (batch × spatial positions × probes).
        sums: per group, the sum of the joint feature vector (N·n,), float64.
        moments: per group, the sum of outer products (N·n × N·n), float64.
    """

    sizes: dict[str, int]
    num_models: int
    counts: dict[str, int]
    sums: dict[str, Tensor]
    moments: dict[str, Tensor]

    def _slice(self, group: str, model: int | None) -> slice:
        n = self.sizes[group]
        if model is None:
            return slice(0, n * self.num_models)
        if not 0 <= model < self.num_models:
            raise ValueError(f"FeatureStats: model {model} out of range for {self.num_models} models")
        return slice(model * n, (model + 1) * n)

    def _count(self, group: str) -> int:
        if group not in self.counts:
            raise KeyError(f"FeatureStats has no group {group!r}; groups: {sorted(self.counts)}")
        if self.counts[group] == 0:
            raise ValueError(f"FeatureStats: group {group!r} saw no samples")
        return self.counts[group]

    def mean(self, group: str, model: int | None = None) -> Tensor:
        """Mean activation of each unit: joint (N·n,) or one model's (n,)."""
        c = self._count(group)
        return self.sums[group][self._slice(group, model)] / c

    def second_moment(self, group: str, a: int | None = None, b: int | None = None) -> Tensor:
        """``E[x_a x_bᵀ]`` (raw, uncentred), joint when ``a``/``b`` are ``None``."""
        c = self._count(group)
        return self.moments[group][self._slice(group, a), self._slice(group, b)] / c

    def cov(self, group: str, a: int | None = None, b: int | None = None) -> Tensor:
        """Population covariance between model ``a``'s and model ``b``'s units (joint matrix by default).

        ``cov(g)`` is the (N·n × N·n) joint matrix; ``cov(g, 0, 1)`` the (n × n) cross block; ``cov(g, 0)`` the
        block of model 0 against all models.
        """
        ma, mb = self.mean(group, a), self.mean(group, b)
        return self.second_moment(group, a, b) - torch.outer(ma, mb)

    def var(self, group: str, model: int | None = None) -> Tensor:
        """Per-unit variance, clamped at zero (round-off below ``1e-10·E[x²]`` counts as zero)."""
        sl = self._slice(group, model)
        sq = torch.diagonal(self.moments[group])[sl] / self._count(group)
        v = sq - self.mean(group, model) ** 2
        return torch.where(v > _REL_VAR_EPS * sq.abs(), v, torch.zeros_like(v))

    def std(self, group: str, model: int | None = None) -> Tensor:
        return self.var(group, model).sqrt()

    def corr(self, group: str, a: int | None = None, b: int | None = None) -> Tensor:
        """Pearson correlation between units; a unit with zero variance correlates 0 with everything (no NaN)."""
        cov = self.cov(group, a, b)
        sa, sb = self.std(group, a), self.std(group, b)
        denom = torch.outer(sa, sb)
        safe = denom > 0
        return torch.where(
            safe, cov / torch.where(safe, denom, torch.ones_like(denom)), torch.zeros_like(cov)
        )


def collect_features(
    models: Sequence[nn.Module],
    structure: Structure,
    data: Iterable,
    *,
    max_batches: int | None = None,
    groups: Sequence[str] | None = None,
) -> FeatureStats:
    """Stream ``data`` through every model and accumulate per-group joint activation statistics.

    Args:
        models: models of one architecture (they share ``structure``).
        structure: the groups; probes say where units are read (see the module docstring for the fallback).
        data: iterable of batches ``x`` or ``(x, y)``; every model sees the same batches.
        max_batches: stop after this many batches.
        groups: restrict to these groups (default: all).

    Returns:
        A :class:`FeatureStats`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mergelab.structure.types import Axis, Group, Probe, Structure
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> s = Structure((Group("0", 3, (Axis("0.weight", 0, "out"), Axis("2.weight", 1, "in"))),))
        >>> st = collect_features([net, net], s, [torch.randn(16, 4)])
        >>> st.cov("0").shape
        torch.Size([6, 6])
    """
    models = list(models)
    if not models:
        raise ValueError("collect_features: got no models")
    chosen = [structure[g] for g in groups] if groups is not None else list(structure)
    n_models = len(models)
    sizes = {g.name: g.size for g in chosen}
    sums = {g.name: torch.zeros(n_models * g.size, dtype=torch.float64) for g in chosen}
    moments = {g.name: torch.zeros(n_models * g.size, n_models * g.size, dtype=torch.float64) for g in chosen}
    counts = {g.name: 0 for g in chosen}

    use_graph = any(p.site == "node" for g in chosen for p in g.probes)
    graphs = [trace_model(m) for m in models] if use_graph else [None] * n_models
    # records[model][group] = list of (samples × n) tensors from this batch, in call order
    records: list[dict[str, list[Tensor]]] = [{g.name: [] for g in chosen} for _ in models]

    def make_cb(i: int, g: Group, dim: int, where: str) -> Callable[[Tensor], None]:
        def cb(t: Tensor) -> None:
            records[i][g.name].append(_flatten_units(t, dim, g.size, where).double().cpu())

        return cb

    def make_raw_cb(i: int, g: Group) -> Callable[[Tensor], None]:
        def cb(t: Tensor) -> None:
            records[i][g.name].append(t.double().cpu())

        return cb

    handles = []
    taps: list[dict[str, list[Callable[[Tensor], None]]]] = [{} for _ in models]
    modes = contextlib.ExitStack()  # eval mode for the pass; every submodule's own mode back in `finally`
    modes.enter_context(eval_mode(*models))
    try:
        for i, model in enumerate(models):
            for g in chosen:
                if g.probes:
                    for p in g.probes:
                        if p.site == "node":
                            taps[i].setdefault(p.node, []).append(
                                make_cb(i, g, p.dim, f"probe {p.node!r} of {g.name!r}")
                            )
                            continue
                        mod = model.get_submodule(p.node)
                        hook = _probe_hook(p, g.size, make_raw_cb(i, g))
                        if p.site == "input":
                            handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
                        else:
                            handles.append(mod.register_forward_hook(hook, with_kwargs=True))
                else:
                    tap = fallback_taps(model, g)
                    where = f"module {tap.module!r} ({tap.source}, group {g.name!r})"
                    cb = make_cb(i, g, tap.dim, where)
                    hook = _tap_hook(tap, g.size, dict(model.named_parameters()), cb)
                    mod = model.get_submodule(tap.module)
                    handles.append(mod.register_forward_hook(hook, with_kwargs=True))
            if use_graph:
                gm = graphs[i]
                assert gm is not None
                known = {n.name for n in gm.graph.nodes}
                missing = sorted(set(taps[i]) - known)
                if missing:
                    raise ValueError(f"collect_features: probe nodes {missing} are not in the traced graph")
        with torch.no_grad():
            for x, _ in batches(data, max_batches=max_batches):
                for i, model in enumerate(models):
                    dev = next((p.device for p in model.parameters()), x.device)
                    if use_graph:
                        _Recorder(graphs[i], taps[i]).run(x.to(dev))  # type: ignore[arg-type]
                    else:
                        model(x.to(dev))
                for g in chosen:
                    calls = [records[i][g.name] for i in range(n_models)]
                    if len({len(c) for c in calls}) != 1:
                        raise ValueError(
                            f"collect_features: group {g.name!r} was observed {[len(c) for c in calls]} times in "
                            f"the models' forward passes; the architectures differ"
                        )
                    for parts in zip(*calls, strict=True):
                        joint = torch.cat(parts, dim=1)  # (samples, N*n)
                        sums[g.name] += joint.sum(0)
                        moments[g.name] += joint.T @ joint
                        counts[g.name] += joint.shape[0]
                    for c in calls:
                        c.clear()
    finally:
        for h in handles:
            h.remove()
        modes.close()
    empty = [g for g, c in counts.items() if c == 0]
    if empty:
        raise ValueError(f"collect_features: no samples for groups {empty} (empty data?)")
    logger.debug("collect_features: %d groups, samples %s", len(chosen), counts)
    return FeatureStats(sizes, n_models, counts, sums, moments)
