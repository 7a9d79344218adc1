"""Late-phase weights (von Oswald, Kobayashi, Sacramento, Meulemans, Henning, Grewe, ICLR 2021,
https://arxiv.org/abs/2007.12927) as a trainer callback.

From epoch ``t0`` on, a small subset of the weights is kept in ``k`` copies ("members"). Everything else stays
shared. Each minibatch trains one member, and the shared weights get their gradient through that member. At the
end the members are averaged in weight space into one plain model, so inference costs nothing extra. The
members can also be kept as a cheap ensemble.

Variants (``variant=``):

* ``"bn"``: the affine parameters (weight, bias) of every BatchNorm/LayerNorm/GroupNorm, and optionally of
  the classifier ``head`` (``head=True``; the authors' released configs tie "head, batchnorm"). Members start
  from the current values plus ``N(0, noise²)`` (default ``noise=0``, as in the released configs).
* ``"rank1"``: a multiplicative rank-1 factor per ``Linear``/``Conv`` layer, ``W ⊙ r sᵀ`` as in BatchEnsemble.
  It is applied by hooks as ``r ⊙ (W (s ⊙ x))`` (the bias is not scaled). ``r`` and ``s`` start at
  ``1 + N(0, noise²)`` (default ``noise=0.1``, our choice). At the end the mean effective weight
  ``mean_k W ⊙ r_k s_kᵀ`` is folded into ``W``.

The model keeps its architecture and parameter names throughout. ``bn`` copies member ``i``'s values into
the norm parameters before a step and copies the updated values out after it. ``rank1`` hooks the layers
only while steps run. Between epochs the model holds the averaged late-phase weights, with no hooks. So the
trainer's per-epoch test curve shows the averaged model (its BatchNorm statistics are the running ones
accumulated over all members), and an :class:`~mergelab.train.swa.SWACallback` placed after this one
averages the collapsed model over epochs.

Member schedule (``schedule=``):

* ``"cycle"`` (the paper's Algorithm 1 and the authors' released configs, ``inner_training``): members
  ``0..k-1`` are trained in turn, each on its own minibatch. The shared weights' gradients are *summed* over
  the ``k`` minibatches (γ_θ = 1, as in the authors' code). The shared optimizer steps once per full cycle,
  and once more at the very end for a partial cycle. ``shared_grad="mean"`` uses the cycle's mean instead
  (γ_θ = 1/K). The sum is a K-times larger step and can diverge at a high constant learning rate.
* ``"random"``: a member is drawn uniformly for every minibatch (a private, seeded generator), and the shared
  weights step on every minibatch.

Optimizer state: each member has its own optimizer instance. It has the trainer's optimizer class and
hyper-parameters, and its learning rate follows the trainer's schedule times ``lr_scale``. So momentum and
Adam moments are never mixed between members (the authors also keep one optimizer per member). For ``bn``,
every member's state starts as a copy of the trainer's state for those parameters, so momentum carries on
across ``t0``. This is what makes ``k=1`` exactly ordinary training. Rank-1 factors are new, so their state
starts fresh, and their weight decay defaults to 0. The late-phase parameters are removed from the trainer's
optimizer for the late phase and put back at the end.

BatchNorm running statistics are shared by the members during training. When ``k > 1`` they are recomputed on
``bn_data`` at the end, for the averaged model and for each member model. With ``k = 1`` nothing was averaged,
so the model is left exactly as ordinary training leaves it.

Example:
    >>> import torch, mergelab
    >>> from torch.utils.data import TensorDataset
    >>> ds = TensorDataset(torch.randn(96, 1, 8, 8), torch.randint(0, 10, (96,)))
    >>> m = mergelab.build_model("vgg", (1, 8, 8), 10, width=0.125, norm="batchnorm")
    >>> cfg = mergelab.TrainConfig(epochs=3, batch_size=32, progress=False)
    >>> r = train_late_phase(m, ds, cfg, variant="bn", k=3, t0=1)
    >>> len(r.members), r.model is m
    (3, True)
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mergelab.batchnorm import has_batchnorm, update_batchnorm
from mergelab.evaluation import Metrics, batches, eval_mode, evaluate
from mergelab.train.swa import SWACallback, as_loader, base_optimizer, default_swa_start
from mergelab.train.trainer import BaseCallback, Callback, History, TrainConfig, TrainState, train

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_NOISE",
    "LatePhaseCallback",
    "LatePhaseResult",
    "default_t0",
    "evaluate_ensemble",
    "late_phase_norm_parameters",
    "rank1_layers",
    "train_late_phase",
]

Variant = Literal["bn", "rank1"]
MemberSchedule = Literal["cycle", "random"]
SharedGrad = Literal["sum", "mean"]
VARIANTS: tuple[str, ...] = ("bn", "rank1")
SCHEDULES: tuple[str, ...] = ("cycle", "random")
SHARED_GRADS: tuple[str, ...] = ("sum", "mean")
DEFAULT_NOISE: dict[str, float] = {"bn": 0.0, "rank1": 0.1}  # bn: authors' noise_std_init; rank1: our choice
NORM_TYPES = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
)  # _NormBase: BatchNorm, InstanceNorm
RANK1_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def default_t0(epochs: int) -> int:
    """The paper's proportion: late phase from 60 % of training (T0 = 120 of 200 epochs on CIFAR)."""
    return min(max(0, int(0.6 * epochs)), epochs - 1)


def late_phase_norm_parameters(model: nn.Module, *, head: bool = False) -> list[tuple[str, nn.Parameter]]:
    """The ``bn`` variant's late-phase parameters: trainable affine weights/biases of the norm layers.

    Args:
        model: any module.
        head: also include the classifier ``model.head`` (an ``nn.Linear``), as the authors' configs do.

    Returns:
        ``(name, parameter)`` pairs in ``named_parameters`` order (empty if the model has no affine norm).
    """
    wanted: set[int] = set()
    for m in model.modules():
        if isinstance(m, NORM_TYPES):
            wanted.update(
                id(p)
                for p in (getattr(m, "weight", None), getattr(m, "bias", None))
                if isinstance(p, nn.Parameter)
            )
    if head:
        h = getattr(model, "head", None)
        if not isinstance(h, nn.Linear):
            raise ValueError(
                f"late-phase 'bn' with head=True: {type(model).__name__} has no nn.Linear 'head'"
            )
        wanted.update(id(p) for p in h.parameters())
    return [(n, p) for n, p in model.named_parameters() if id(p) in wanted and p.requires_grad]


def rank1_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``rank1`` variant's layers: every ``nn.Linear`` and (non-transposed) ``nn.Conv1d/2d/3d``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, RANK1_TYPES) and m.weight.requires_grad]


# --------------------------------------------------------------------------------------------------------
# Members: how each variant stores K copies and swaps one into the model.
# --------------------------------------------------------------------------------------------------------


class _Members:
    """K late-phase weight sets. ``activate(i)`` before a step; ``release(i)`` after it; between epochs
    ``write_average()`` leaves a plain model holding the average."""

    k: int

    def shared_exclusions(self) -> list[nn.Parameter]:
        """Model parameters that leave the trainer's optimizer during the late phase."""
        return []

    def optim_params(self, i: int) -> list[torch.Tensor]:
        raise NotImplementedError

    def activate(self, i: int) -> None:
        raise NotImplementedError

    def release(self, i: int) -> None:
        pass

    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        """The model tensors (by state-dict name) that member ``i`` changes, as plain values."""
        raise NotImplementedError

    def write_average(self) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Leave the model plain with the averaged weights for good."""
        self.write_average()

    def average_state(self) -> dict[str, torch.Tensor]:
        states = [self.member_state(i) for i in range(self.k)]
        out = {}
        for name in states[0]:
            total = states[0][name].clone()
            for s in states[1:]:
                total += s[name]
            out[name] = total / self.k  # k = 1: x / 1 is x exactly
        return out


class _NormMembers(_Members):
    def __init__(self, model: nn.Module, k: int, noise: float, gen: torch.Generator, head: bool) -> None:
        self.k = k
        self.params = late_phase_norm_parameters(model, head=head)
        self.values: list[list[torch.Tensor]] = []
        for _ in range(k):
            member = []
            for _, p in self.params:
                v = p.detach().clone()
                if noise > 0:
                    v += noise * torch.randn(v.shape, generator=gen, dtype=v.dtype)
                member.append(v)
            self.values.append(member)

    def shared_exclusions(self) -> list[nn.Parameter]:
        return [p for _, p in self.params]

    def optim_params(self, i: int) -> list[torch.Tensor]:
        return [p for _, p in self.params]  # every member steps the model's own tensors, with its own state

    @torch.no_grad()
    def activate(self, i: int) -> None:
        for (_, p), v in zip(self.params, self.values[i], strict=True):
            p.copy_(v)

    @torch.no_grad()
    def release(self, i: int) -> None:
        for (_, p), v in zip(self.params, self.values[i], strict=True):
            v.copy_(p)

    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        return {n: v.clone() for (n, _), v in zip(self.params, self.values[i], strict=True)}

    @torch.no_grad()
    def write_average(self) -> None:
        avg = self.average_state()
        for n, p in self.params:
            p.copy_(avg[n])


class _Rank1Members(_Members):
    def __init__(self, model: nn.Module, k: int, noise: float, gen: torch.Generator) -> None:
        self.k = k
        self.layers = rank1_layers(model)
        self.r: list[list[torch.Tensor]] = []  # [member][layer] (out,)
        self.s: list[list[torch.Tensor]] = []  # [member][layer] (in,)
        for _ in range(k):
            rs, ss = [], []
            for _, m in self.layers:
                w = m.weight
                n_out, n_in = _rank1_dims(m)
                rs.append((1.0 + noise * torch.randn(n_out, generator=gen, dtype=w.dtype)).requires_grad_())
                ss.append((1.0 + noise * torch.randn(n_in, generator=gen, dtype=w.dtype)).requires_grad_())
            self.r.append(rs)
            self.s.append(ss)
        self.current = 0
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.stash: list[torch.Tensor] | None = None  # the shared W while the model holds the averaged one

    def optim_params(self, i: int) -> list[torch.Tensor]:
        return [*self.r[i], *self.s[i]]

    def activate(self, i: int) -> None:
        self.current = i
        if self.stash is not None:
            with torch.no_grad():
                for (_, m), w in zip(self.layers, self.stash, strict=True):
                    m.weight.copy_(w)
            self.stash = None
        if not self.handles:
            for j, (_, m) in enumerate(self.layers):
                self.handles.append(m.register_forward_pre_hook(self._pre_hook(j)))
                self.handles.append(m.register_forward_hook(self._post_hook(j)))

    def _pre_hook(self, j: int) -> Callable[[nn.Module, tuple], tuple]:
        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            s = self.s[self.current][j]
            s = s if isinstance(module, nn.Linear) else s.view(1, -1, *([1] * (x.dim() - 2)))
            return (x * s, *args[1:])  # (N, in, ...) * s

        return hook

    def _post_hook(self, j: int) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor]:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            r = self.r[self.current][j]
            shape = (-1,) if isinstance(module, nn.Linear) else (1, -1, *([1] * (out.dim() - 2)))
            r = r.view(shape)
            if module.bias is None:
                return out * r
            b = module.bias.view(shape)
            return (out - b) * r + b  # scale W x, not the bias

        return hook

    def _remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    @torch.no_grad()
    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        shared = self.stash if self.stash is not None else [m.weight.detach() for _, m in self.layers]
        return {
            f"{n}.weight": w * _rank1_factor(m, self.r[i][j].detach(), self.s[i][j].detach())
            for j, ((n, m), w) in enumerate(zip(self.layers, shared, strict=True))
        }

    @torch.no_grad()
    def write_average(self) -> None:
        avg = self.average_state()
        if self.stash is None:
            self.stash = [m.weight.detach().clone() for _, m in self.layers]
        self._remove_hooks()
        for n, m in self.layers:
            m.weight.copy_(avg[f"{n}.weight"])

    def finish(self) -> None:
        self.write_average()
        self.stash = None


def _rank1_dims(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, nn.Linear):
        return m.out_features, m.in_features
    return m.out_channels, m.in_channels


def _rank1_factor(m: nn.Module, r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``r sᵀ`` laid out like ``m.weight``: (out, in) or (out, in/groups, *kernel) for grouped convs."""
    if isinstance(m, nn.Linear):
        return r[:, None] * s[None, :]  # (out, in)
    w = m.weight  # (out, in/groups, *kernel)
    n_out, per_group = w.shape[0], w.shape[1]
    group_of_out = torch.arange(n_out) // (n_out // m.groups)  # (out,)
    s_full = s.view(m.groups, per_group)[group_of_out]  # (out, in/groups)
    return (r[:, None] * s_full).view(n_out, per_group, *([1] * (w.dim() - 2)))


def _optimizer_like(base: torch.optim.Optimizer, groups: list[dict]) -> torch.optim.Optimizer:
    """A new optimizer of ``base``'s class and hyper-parameters over ``groups`` (with empty state)."""
    accepted = inspect.signature(type(base).__init__).parameters
    # defaults may hold derived keys the constructor does not take (AdamW's decoupled_weight_decay).
    return type(base)(groups, **{k: v for k, v in base.defaults.items() if k in accepted})


class _LatePhaseOptimizer:
    """Stands in for the trainer's optimizer during the late phase (the trainer only calls ``zero_grad``,
    ``step`` and reads ``param_groups``). ``base_optimizer`` keeps stepping the shared weights and keeps its
    scheduler; member ``current``'s own optimizer steps the late-phase weights."""

    def __init__(
        self, base: torch.optim.Optimizer, members: list[torch.optim.Optimizer], lr_scale: float
    ) -> None:
        self.base_optimizer = base
        self.members = members
        self.lr_scale = lr_scale
        self.current = 0
        self.clear_shared = True  # zero the shared gradients before this step's backward
        self.step_shared = True  # step the shared weights after this step's backward
        self.shared_scale = 1.0  # multiplies the accumulated shared gradients before the shared step

    @property
    def param_groups(self) -> list[dict]:
        return self.base_optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.members[self.current].zero_grad(set_to_none=set_to_none)
        if self.clear_shared:
            self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        lr = self.base_optimizer.param_groups[0]["lr"] * self.lr_scale
        member = self.members[self.current]
        for g in member.param_groups:
            g["lr"] = lr
        member.step()
        if self.step_shared:
            if self.shared_scale != 1.0:
                for g in self.base_optimizer.param_groups:
                    for p in g["params"]:
                        if p.grad is not None:
                            p.grad.mul_(self.shared_scale)
            self.base_optimizer.step()


# --------------------------------------------------------------------------------------------------------
# The callback.
# --------------------------------------------------------------------------------------------------------


class LatePhaseCallback(BaseCallback):
    """Late-phase weights from epoch ``t0`` on; the model ends as the weight average of the ``k`` members.

    Args:
        variant: ``"bn"`` (norm affine parameters) or ``"rank1"`` (``W ⊙ r sᵀ`` per Linear/Conv layer).
        k: number of members (the paper uses 10); ``k=1`` with ``bn`` and ``noise=0`` is ordinary training.
        t0: 0-based epoch at which the late phase starts; ``0 <= t0 < epochs`` (``t0=0`` hurts in the paper).
        noise: std of the members' initial perturbation; default :data:`DEFAULT_NOISE` of the variant.
        schedule: ``"cycle"`` (the paper: members in turn, shared step per full cycle) or ``"random"``
            (uniform member per minibatch, shared step every minibatch).
        shared_grad: ``cycle`` only: the shared step uses the ``"sum"`` of the cycle's gradients (γ_θ = 1, the
            authors' code; like a K-times larger batch at a K-times larger learning rate) or their ``"mean"``
            (γ_θ = 1/K; a K-times larger batch at the same learning rate). ``"sum"`` can diverge at a high
            constant learning rate (see docs/late_phase.md).
        head: ``bn`` only: also give each member its own classifier ``head``.
        lr_scale: members' learning rate relative to the trainer's (scheduled) learning rate.
        member_weight_decay: weight decay of the late-phase weights; default: the trainer's for ``bn``, 0 for
            ``rank1`` (decay would pull the multiplicative factors to 0, not to 1).
        bn_data: data for recomputing BatchNorm statistics at the end (required if the model has BatchNorm
            and ``k > 1``).
        batch_size: batch size for ``bn_data`` when it is a ``Dataset``.
        seed: seed of the private generator for the noise and the ``random`` schedule (the global RNG and the
            data order are untouched).

    After training, ``members`` holds the ``k`` member models (plain copies, BatchNorm recomputed) and
    ``member_steps`` how many minibatches each member trained on; the trained model itself is the average.
    """

    def __init__(
        self,
        variant: Variant = "bn",
        k: int = 10,
        t0: int = 0,
        *,
        noise: float | None = None,
        schedule: MemberSchedule = "cycle",
        shared_grad: SharedGrad = "sum",
        head: bool = False,
        lr_scale: float = 1.0,
        member_weight_decay: float | None = None,
        bn_data: Dataset | DataLoader | Iterable | None = None,
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"late-phase: unknown variant {variant!r}; choose one of {list(VARIANTS)}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"late-phase: k (number of members) must be an int >= 1, got {k!r}")
        if isinstance(t0, bool) or not isinstance(t0, int) or t0 < 0:
            raise ValueError(
                f"late-phase: t0 (first late-phase epoch, 0-based) must be an int >= 0, got {t0!r}"
            )
        noise = DEFAULT_NOISE[variant] if noise is None else float(noise)
        if not (noise >= 0 and math.isfinite(noise)):
            raise ValueError(f"late-phase: noise (member init std) must be >= 0, got {noise!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"late-phase: unknown schedule {schedule!r}; choose one of {list(SCHEDULES)}")
        if shared_grad not in SHARED_GRADS:
            raise ValueError(
                f"late-phase: unknown shared_grad {shared_grad!r}; choose one of {list(SHARED_GRADS)}"
            )
        if not lr_scale > 0:
            raise ValueError(f"late-phase: lr_scale must be positive, got {lr_scale!r}")
        if head and variant != "bn":
            raise ValueError(f"late-phase: head=True only applies to variant 'bn', not {variant!r}")
        if member_weight_decay is not None and member_weight_decay < 0:
            raise ValueError(f"late-phase: member_weight_decay must be >= 0, got {member_weight_decay!r}")
        self.variant, self.k, self.t0, self.noise = variant, k, t0, noise
        self.schedule, self.shared_grad, self.head, self.lr_scale = schedule, shared_grad, head, lr_scale
        self.member_weight_decay = member_weight_decay
        self.bn_data, self.batch_size, self.seed = bn_data, batch_size, seed
        self.members: list[nn.Module] = []
        self.member_steps: list[int] = [0] * k
        self._members: _Members | None = None
        self._opt: _LatePhaseOptimizer | None = None
        self._restore_groups: list[list[torch.Tensor]] = []
        self._late_steps = 0
        self._gen = torch.Generator()

    @property
    def current_member(self) -> int | None:
        """The member trained by the current (or last) step; ``None`` outside the late phase."""
        return None if self._opt is None else self._opt.current

    # -- validation --------------------------------------------------------------------------------------

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` if ``model`` has nothing for this variant to replicate."""
        if self.variant == "bn" and not late_phase_norm_parameters(model, head=self.head):
            raise ValueError(
                f"late-phase 'bn': {type(model).__name__} has no norm layer with affine parameters "
                "(BatchNorm/LayerNorm/GroupNorm); build it with a norm (e.g. norm='batchnorm') or use 'rank1'"
            )
        if self.variant == "rank1" and not rank1_layers(model):
            raise ValueError(f"late-phase 'rank1': {type(model).__name__} has no nn.Linear or nn.Conv layer")

    def check_epochs(self, epochs: int) -> None:
        if self.t0 >= epochs:
            raise ValueError(
                f"late-phase: t0={self.t0} must be < epochs={epochs} (t0 is the 0-based epoch where the late "
                "phase starts)"
            )

    # -- hooks -------------------------------------------------------------------------------------------

    def on_train_begin(self, state: TrainState) -> None:
        self.check_epochs(state.config.epochs)
        self.check_model(state.model)
        if self.k > 1 and self.bn_data is None and has_batchnorm(state.model):
            raise ValueError(
                f"late-phase: {type(state.model).__name__} has BatchNorm layers; pass bn_data (the training "
                "data) so the averaged model's running statistics can be recomputed"
            )
        self._gen.manual_seed(self.seed)
        self.members, self.member_steps, self._late_steps = [], [0] * self.k, 0
        self._members, self._opt = None, None

    def on_epoch_begin(self, state: TrainState) -> None:
        if state.epoch == self.t0:
            self._begin(state)

    def before_step(self, state: TrainState) -> None:
        if self._opt is None or self._members is None:
            return
        pos = self._late_steps % self.k
        if self.schedule == "cycle":
            i = pos
            last = state.step + 1 == state.config.epochs * state.steps_per_epoch
            self._opt.clear_shared = pos == 0
            self._opt.step_shared = pos == self.k - 1 or last
            self._opt.shared_scale = 1.0 / (pos + 1) if self.shared_grad == "mean" and pos > 0 else 1.0
        else:
            i = int(torch.randint(self.k, (1,), generator=self._gen).item())
            self._opt.clear_shared = self._opt.step_shared = True
        self._opt.current = i
        self._members.activate(i)

    def after_step(self, state: TrainState) -> None:
        if self._opt is None or self._members is None:
            return
        self._members.release(self._opt.current)
        self.member_steps[self._opt.current] += 1
        self._late_steps += 1

    def on_epoch_end(self, state: TrainState) -> None:
        if self._members is not None:
            self._members.write_average()

    def on_train_end(self, state: TrainState) -> None:
        if self._members is None or self._opt is None:  # unreachable after check_epochs
            raise ValueError("late-phase: the late phase never started")
        members = self._members
        models = []
        for i in range(self.k):
            m = copy.deepcopy(state.model)
            params = dict(m.named_parameters())
            with torch.no_grad():
                for name, v in members.member_state(i).items():
                    params[name].copy_(v)
            models.append(m)
        members.finish()
        base = self._opt.base_optimizer
        for group, params in zip(base.param_groups, self._restore_groups, strict=True):
            group["params"] = params
        state.optimizer = base
        if self.k > 1 and has_batchnorm(state.model):
            loader = as_loader(self.bn_data, self.batch_size)
            update_batchnorm(state.model, loader)
            for m in models:
                update_batchnorm(m, loader)
        for m in models:
            m.eval()
        self.members = models
        self._members, self._opt = None, None
        log.info(
            "late-phase %s: averaged %d members (steps per member %s)",
            self.variant,
            self.k,
            self.member_steps,
        )

    def _begin(self, state: TrainState) -> None:
        model = state.model
        base = base_optimizer(state.optimizer)
        if self.variant == "bn":
            members: _Members = _NormMembers(model, self.k, self.noise, self._gen, self.head)
        else:
            members = _Rank1Members(model, self.k, self.noise, self._gen)
        excluded = {id(p): p for p in members.shared_exclusions()}
        # Take the late-phase parameters out of the trainer's optimizer, keeping each one's group and state.
        self._restore_groups = [list(g["params"]) for g in base.param_groups]
        spec: list[tuple[list[int], float]] = []  # per base group: late-phase param ids, weight decay
        carried: dict[int, dict] = {}
        for g in base.param_groups:
            ids = [id(p) for p in g["params"] if id(p) in excluded]
            if ids:
                wd = (
                    g.get("weight_decay", 0.0)
                    if self.member_weight_decay is None
                    else self.member_weight_decay
                )
                spec.append((ids, wd))
            for pid in ids:
                st = base.state.pop(excluded[pid], None)
                if st:
                    carried[pid] = st
            g["params"] = [p for p in g["params"] if id(p) not in excluded]
        opts = []
        for i in range(self.k):
            params = members.optim_params(i)
            if self.variant == "bn":
                by_id = {id(p): p for p in params}
                groups = [{"params": [by_id[pid] for pid in ids], "weight_decay": wd} for ids, wd in spec]
            else:
                wd = 0.0 if self.member_weight_decay is None else self.member_weight_decay
                groups = [{"params": params, "weight_decay": wd}]
            opt = _optimizer_like(base, groups)
            for p in params:
                if id(p) in carried:
                    opt.state[p] = copy.deepcopy(carried[id(p)])
            opts.append(opt)
        self._members = members
        self._opt = _LatePhaseOptimizer(base, opts, self.lr_scale)
        state.optimizer = self._opt  # type: ignore[assignment]  # duck-typed: zero_grad/step/param_groups
        n = sum(t.numel() for t in members.optim_params(0))
        log.info(
            "late-phase %s: %d members of %d weights each from epoch %d (%s schedule)",
            self.variant,
            self.k,
            n,
            state.epoch,
            self.schedule,
        )


# --------------------------------------------------------------------------------------------------------
# Ensembles and the one-call API.
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_ensemble(models: Sequence[nn.Module], data: Iterable) -> Metrics:
    """Accuracy and NLL of the members' averaged softmax outputs (the ensemble the average is compared with).

    Args:
        models: the members (evaluated in eval mode; their train flags are restored).
        data: batches of ``(x, y)``.

    Returns:
        ``Metrics(loss=NLL of the mean probability, accuracy, count)``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> data = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]
        >>> evaluate_ensemble([nn.Linear(3, 2), nn.Linear(3, 2)], data).count
        4
    """
    if not models:
        raise ValueError("evaluate_ensemble: got no models")
    total, correct, count = 0.0, 0, 0
    with eval_mode(*models):
        for x, y in batches(data):
            if y is None:
                raise ValueError(
                    "evaluate_ensemble: the loader yields no labels; it must yield (x, y) batches"
                )
            probs = torch.stack([m(x).softmax(-1) for m in models]).mean(0)  # (N, classes)
            total += F.nll_loss(probs.clamp_min(1e-12).log(), y, reduction="sum").item()
            correct += (probs.argmax(-1) == y).sum().item()
            count += len(y)
    if count == 0:
        raise ValueError("evaluate_ensemble: the loader is empty")
    return Metrics(total / count, correct / count, count)


@dataclass
class LatePhaseResult:
    """What :func:`train_late_phase` returns.

    Attributes:
        model: the single model to use: ``swa_model`` if SWA was on, else ``averaged``.
        averaged: the ``k`` members averaged in weight space (the input model, trained in place).
        members: the ``k`` member models (final iterates), for the ensemble.
        history: per-epoch curves (during the late phase: of the averaged model).
        swa_model: SWA average of the averaged late-phase model over epochs, or ``None``.
        member_steps: minibatches each member trained on.
    """

    model: nn.Module
    averaged: nn.Module
    members: list[nn.Module]
    history: History
    variant: str
    k: int
    t0: int
    swa_model: nn.Module | None = None
    member_steps: list[int] = field(default_factory=list)

    def evaluate(self, data: Dataset | DataLoader | Iterable, batch_size: int = 512) -> dict[str, Metrics]:
        """Test metrics of the averaged model, the members' ensemble, each member, and the SWA model.

        Returns:
            ``{"averaged", "ensemble", "member_0", ..., "swa" (if any)}`` → :class:`Metrics`.
        """
        loader = list(as_loader(data, batch_size))
        out = {
            "averaged": evaluate(self.averaged, loader),
            "ensemble": evaluate_ensemble(self.members, loader),
        }
        for i, m in enumerate(self.members):
            out[f"member_{i}"] = evaluate(m, loader)
        if self.swa_model is not None:
            out["swa"] = evaluate(self.swa_model, loader)
        return out


def train_late_phase(
    model: nn.Module,
    train_data: Dataset | DataLoader,
    config: TrainConfig | None = None,
    *,
    variant: Variant = "bn",
    k: int = 10,
    t0: int | None = None,
    noise: float | None = None,
    swa: bool = False,
    swa_start: int | None = None,
    swa_lr: float | None = None,
    test_data: Dataset | DataLoader | None = None,
    bn_data: Dataset | DataLoader | None = None,
    schedule: MemberSchedule = "cycle",
    shared_grad: SharedGrad = "sum",
    head: bool = False,
    lr_scale: float = 1.0,
    seed: int = 0,
    callbacks: Sequence[Callback] = (),
) -> LatePhaseResult:
    """Train ``model`` in place with late-phase weights and return the averaged model and its members.

    Args:
        model: a classifier (for ``bn`` it needs BatchNorm/LayerNorm/GroupNorm layers); it ends as the average.
        train_data: training ``Dataset`` or ``DataLoader``.
        config: hyper-parameters (the paper: SGD, lr 0.1, momentum 0.9, weight decay 5e-4, 200 epochs).
        variant: ``"bn"`` or ``"rank1"``.
        k: number of members (paper: 10).
        t0: 0-based epoch where the late phase starts; default :func:`default_t0` (60 %, the paper's 120/200).
        noise: std of the members' initial perturbation; default :data:`DEFAULT_NOISE` of the variant.
        swa: also average the (collapsed) late-phase model over epochs with SWA.
        swa_start: first SWA epoch (0-based); default 75 % of the epochs.
        swa_lr: constant SWA learning rate from ``swa_start`` (``SWALR``); ``None`` keeps the schedule.
        test_data: evaluated after every epoch.
        bn_data: data for recomputing BatchNorm statistics; default ``train_data``.
        schedule: ``"cycle"`` (the paper) or ``"random"`` member order (see the module docstring).
        shared_grad: ``cycle`` only: ``"sum"`` (the authors' code) or ``"mean"`` of the cycle's shared gradients.
        head: ``bn`` only: members also get their own classifier head.
        lr_scale: members' learning rate relative to the scheduled one.
        seed: seed for the member noise and the ``random`` schedule.
        callbacks: more callbacks, run after the late-phase (and SWA) ones.

    Returns:
        :class:`LatePhaseResult` with the averaged model, the ``k`` members and the history.

    Raises:
        ValueError: ``k < 1``, ``t0 >= epochs``, an unknown variant or schedule, a model without norm layers
            for ``bn``, or ``swa_start`` outside ``[0, epochs)``.

    Example:
        >>> import torch, mergelab
        >>> from torch.utils.data import TensorDataset
        >>> ds = TensorDataset(torch.randn(96, 1, 8, 8), torch.randint(0, 10, (96,)))
        >>> m = mergelab.build_model("resnet", (1, 8, 8), 10, depth=8, width=0.25)
        >>> cfg = mergelab.TrainConfig(epochs=2, batch_size=32, optimizer="sgd", lr=0.05, progress=False)
        >>> r = train_late_phase(m, ds, cfg, variant="rank1", k=2, t0=1, swa=True, swa_start=1)
        >>> sorted(r.evaluate(ds))
        ['averaged', 'ensemble', 'member_0', 'member_1', 'swa']
    """
    cfg = config or TrainConfig()
    t0 = default_t0(cfg.epochs) if t0 is None else t0
    bn = train_data if bn_data is None else bn_data
    bn_batch = max(cfg.batch_size, 256)
    late = LatePhaseCallback(
        variant,
        k,
        t0,
        noise=noise,
        schedule=schedule,
        shared_grad=shared_grad,
        head=head,
        lr_scale=lr_scale,
        bn_data=bn,
        batch_size=bn_batch,
        seed=seed,
    )
    late.check_epochs(cfg.epochs)
    late.check_model(model)
    cbs: list[Callback] = [late]
    swa_cb = None
    if swa:
        start = default_swa_start(cfg.epochs) if swa_start is None else swa_start
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < cfg.epochs:
            raise ValueError(f"late-phase: swa_start={start!r} must be an epoch in [0, {cfg.epochs})")
        swa_cb = SWACallback(start, bn_data=bn, swa_lr=swa_lr, batch_size=bn_batch)
        cbs.append(swa_cb)
    history = train(model, train_data, cfg, test_data=test_data, callbacks=[*cbs, *callbacks])
    swa_model = swa_cb.model if swa_cb is not None else None
    return LatePhaseResult(
        model=swa_model if swa_model is not None else model,
        averaged=model,
        members=late.members,
        history=history,
        variant=variant,
        k=k,
        t0=t0,
        swa_model=swa_model,
        member_steps=list(late.member_steps),
    )
