"""Late-phase members: which weights each variant keeps in ``k`` copies, and how a copy is swapped in.

The two variants of :mod:`mergelab.train.late_phase` differ only here. ``bn`` (:class:`NormMembers`) keeps
``k`` copies of the norm layers' affine parameters and copies member ``i`` into the model before a step (and
out after it). ``rank1`` (:class:`Rank1Members`) keeps ``k`` BatchEnsemble factors ``r``, ``s`` per
``Linear``/``Conv`` layer and applies member ``i``'s as hooks, ``r ⊙ (W (s ⊙ x))``. Both average their members
in weight space (``write_average``), leaving a plain model of the same architecture.

Paper: von Oswald et al., "Neural networks with late-phase weights", ICLR 2021, https://arxiv.org/abs/2007.12927.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "NORM_TYPES",
    "RANK1_TYPES",
    "Members",
    "NormMembers",
    "Rank1Members",
    "late_phase_norm_parameters",
    "rank1_dims",
    "rank1_factor",
    "rank1_layers",
]

NORM_TYPES = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
)  # _NormBase: BatchNorm, InstanceNorm
RANK1_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


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


class Members:
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


class NormMembers(Members):
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


class Rank1Members(Members):
    def __init__(self, model: nn.Module, k: int, noise: float, gen: torch.Generator) -> None:
        self.k = k
        self.layers = rank1_layers(model)
        self.r: list[list[torch.Tensor]] = []  # [member][layer] (out,)
        self.s: list[list[torch.Tensor]] = []  # [member][layer] (in,)
        for _ in range(k):
            rs, ss = [], []
            for _, m in self.layers:
                w = m.weight
                n_out, n_in = rank1_dims(m)
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
            f"{n}.weight": w * rank1_factor(m, self.r[i][j].detach(), self.s[i][j].detach())
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


def rank1_dims(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, nn.Linear):
        return m.out_features, m.in_features
    return m.out_channels, m.in_channels


def rank1_factor(m: nn.Module, r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``r sᵀ`` laid out like ``m.weight``: (out, in) or (out, in/groups, *kernel) for grouped convs."""
    if isinstance(m, nn.Linear):
        return r[:, None] * s[None, :]  # (out, in)
    w = m.weight  # (out, in/groups, *kernel)
    n_out, per_group = w.shape[0], w.shape[1]
    group_of_out = torch.arange(n_out) // (n_out // m.groups)  # (out,)
    s_full = s.view(m.groups, per_group)[group_of_out]  # (out, in/groups)
    return (r[:, None] * s_full).view(n_out, per_group, *([1] * (w.dim() - 2)))
