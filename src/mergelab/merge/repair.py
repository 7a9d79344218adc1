"""Correcting a merged model's activation statistics: BatchNorm reset and REPAIR.

Averaging two aligned networks shrinks the variance of their hidden units ("variance collapse", Jordan et al.,
REPAIR, ICLR 2023, https://arxiv.org/abs/2211.08403): a merged unit is the average of two imperfectly correlated
units, so its activations have a smaller spread than either endpoint's, and the shrinkage compounds with depth.

* :func:`reset_batchnorm` recomputes BatchNorm running statistics on data (with
  ``torch.optim.swa_utils.update_bn``, on a copy): the merged net's BN layers then normalise what actually reaches them.
* :func:`repair` makes every corrected unit's mean and standard deviation equal the interpolation of the
  endpoints' statistics, ``Σ_i λ_i μ_i`` and ``Σ_i λ_i σ_i``.

Our choice of where and how REPAIR corrects (the result is always a plain model of the same architecture):

* *Sites* are found on the ``torch.fx`` graph, in forward order: every BatchNorm with affine parameters and
  running statistics, and every ``Linear`` / ``Conv{1,2,3}d`` whose output does not go straight into a
  BatchNorm and from which another such layer is still reachable (the classifier that produces the logits is
  left alone). Untraceable models fall back to module registration order.
* A BatchNorm site is corrected in the norm itself: its running statistics are set to the merged model's
  actual input statistics, and its affine weight/bias are set so that its output has the target mean and std
  (the sign of each weight is kept). For BN networks this generalises "BN reset" (which would target
  ``mean = β̄`` and ``std = |γ̄|``).
* A Linear/Conv site is corrected by folding the affine correction into the layer: output row ``c`` of the
  weight is scaled by ``σ_t/σ_m`` and the bias becomes ``(b − μ_m)·σ_t/σ_m + μ_t``. A layer without bias only
  gets the scale (logged).
* Sites are corrected one at a time in forward order, each measured with all earlier corrections in place, so
  after :func:`repair` the statistics at every site equal the targets on the given data (REPAIR's notebooks
  estimate all sites in one pass with batch statistics instead; ours costs one truncated pass per site).

Statistics are population mean/std per channel over every sample and spatial position, in eval mode. Use a
loader that yields the same samples on every pass (no shuffling, or full passes) for exact agreement.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from mergelab.batchnorm import has_batchnorm, update_batchnorm
from mergelab.evaluation import batches, eval_mode
from mergelab.match.features import trace_model, unit_dim
from mergelab.structure.checks import check_same_architecture, normalize_coefficients

__all__ = ["channel_statistics", "repair", "repair_sites", "reset_batchnorm"]

logger = logging.getLogger(__name__)

SiteKind = Literal["bn", "affine"]
_AFFINE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _Stop(Exception):
    """Raised inside a hook to end a forward pass once the statistics needed are recorded."""


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def reset_batchnorm(model: nn.Module, data: Iterable, *, max_batches: int | None = None) -> nn.Module:
    """Recompute every BatchNorm's running statistics on ``data`` (a cumulative average, momentum ``None``).

    :func:`mergelab.batchnorm.update_batchnorm` (``torch.optim.swa_utils.update_bn``) on a copy: the input
    model is untouched, and BN momentum and train/eval modes of the copy are as they were.

    Args:
        model: the network (e.g. a merged model).
        data: batches ``x`` or ``(x, y)``.
        max_batches: use at most this many batches.

    Returns:
        A new model with fresh BN statistics (an unchanged copy, with a warning, if it has no BatchNorm).
    """
    out = copy.deepcopy(model)
    if not has_batchnorm(out):
        logger.warning(
            "reset_batchnorm: %s has no BatchNorm with running statistics; nothing to reset",
            type(model).__name__,
        )
        return out
    return update_batchnorm(out, data, max_batches=max_batches)


class _Moments:
    def __init__(self) -> None:
        self.n = 0
        self.s: Tensor | None = None
        self.sq: Tensor | None = None

    def add(self, t: Tensor, dim: int) -> None:
        x = t.detach().movedim(dim, -1).reshape(-1, t.shape[dim]).double()
        s, sq = x.sum(0).cpu(), (x * x).sum(0).cpu()
        self.s = s if self.s is None else self.s + s
        self.sq = sq if self.sq is None else self.sq + sq
        self.n += x.shape[0]

    def mean_var(self, where: str) -> tuple[Tensor, Tensor]:
        if self.s is None or self.sq is None or self.n == 0:
            raise ValueError(
                f"repair: no activations recorded at {where!r} (empty data, or module not called)"
            )
        mean = self.s / self.n
        var = (self.sq / self.n - mean**2).clamp_min(0)
        return mean, var


def _collect(
    model: nn.Module,
    names: Sequence[str],
    data: Iterable,
    *,
    inputs: bool,
    max_batches: int | None,
    stop_at: str | None = None,
) -> dict[str, _Moments]:
    acc = {n: _Moments() for n in names}
    handles = []

    def hook(name: str, mod: nn.Module):
        def fn(_m: nn.Module, inp: tuple, out: Tensor) -> None:
            t = inp[0] if inputs else out
            acc[name].add(t, 1 if inputs else unit_dim(mod))
            if name == stop_at:
                raise _Stop

        return fn

    try:
        for n in names:
            mod = model.get_submodule(n)
            handles.append(mod.register_forward_hook(hook(n, mod)))
        with eval_mode(model), torch.no_grad():
            for x, _ in batches(data, max_batches=max_batches, device=_device(model)):
                with contextlib.suppress(_Stop):
                    model(x)
    finally:
        for h in handles:
            h.remove()
    return acc


def channel_statistics(
    model: nn.Module,
    modules: Sequence[str],
    data: Iterable,
    *,
    max_batches: int | None = None,
    inputs: bool = False,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-channel population mean and std of the outputs (or inputs) of named modules, in eval mode.

    Args:
        model: the network.
        modules: module names (as in ``named_modules``).
        data: batches ``x`` or ``(x, y)``.
        max_batches: use at most this many batches.
        inputs: read each module's first input instead of its output (channel dim 1).

    Returns:
        name → ``(mean, std)``, float64 vectors over channels (dim 1 of conv/norm maps, last dim of Linear).
    """
    acc = _collect(model, list(modules), data, inputs=inputs, max_batches=max_batches)
    out = {}
    for n, m in acc.items():
        mean, var = m.mean_var(n)
        out[n] = (mean, var.sqrt())
    return out


def repair_sites(model: nn.Module) -> list[tuple[str, SiteKind]]:
    """Where :func:`repair` corrects statistics, in forward order (see the module docstring)."""
    try:
        gm = trace_model(model)
    except (ValueError, TypeError):
        logger.warning(
            "repair: %s is not fx-traceable; using module registration order", type(model).__name__
        )
        return _sites_by_registration(model)
    nodes = list(gm.graph.nodes)
    calls: dict[str, int] = {}
    for nd in nodes:
        if nd.op == "call_module":
            calls[str(nd.target)] = calls.get(str(nd.target), 0) + 1

    def is_layer(nd: torch.fx.Node) -> bool:
        return nd.op == "call_module" and isinstance(
            model.get_submodule(str(nd.target)), (*_AFFINE_TYPES, _BatchNorm)
        )

    downstream: dict[torch.fx.Node, bool] = {}
    for nd in reversed(nodes):  # reverse topological: users are done first
        downstream[nd] = any(is_layer(u) or downstream[u] for u in nd.users)
    sites: list[tuple[str, SiteKind]] = []
    for nd in nodes:
        if nd.op != "call_module":
            continue
        name = str(nd.target)
        mod = model.get_submodule(name)
        if not isinstance(mod, (*_AFFINE_TYPES, _BatchNorm)):
            continue
        if calls[name] > 1:
            logger.warning(
                "repair: module %r is called %d times; its statistics are ambiguous, skipped",
                name,
                calls[name],
            )
            continue
        if isinstance(mod, _BatchNorm):
            if mod.affine and mod.track_running_stats:
                sites.append((name, "bn"))
            continue
        users = list(nd.users)
        feeds_bn = (
            len(users) == 1
            and users[0].op == "call_module"
            and isinstance(model.get_submodule(str(users[0].target)), _BatchNorm)
        )
        if not feeds_bn and downstream[nd]:
            sites.append((name, "affine"))
    return sites


def _sites_by_registration(model: nn.Module) -> list[tuple[str, SiteKind]]:
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, (*_AFFINE_TYPES, _BatchNorm))]
    sites: list[tuple[str, SiteKind]] = []
    last_affine = max((i for i, (_, m) in enumerate(mods) if isinstance(m, _AFFINE_TYPES)), default=-1)
    for i, (n, m) in enumerate(mods):
        if isinstance(m, _BatchNorm):
            if m.affine and m.track_running_stats:
                sites.append((n, "bn"))
        elif i != last_affine and not (i + 1 < len(mods) and isinstance(mods[i + 1][1], _BatchNorm)):
            sites.append((n, "affine"))
    return sites


def repair(
    merged: nn.Module,
    endpoints: Sequence[nn.Module],
    data: Iterable,
    coefficients: Sequence[float] | None = None,
    *,
    max_batches: int | None = None,
) -> nn.Module:
    """REPAIR: give the merged model's units the interpolated mean and std of the (aligned) endpoints' units.

    Args:
        merged: the merged model, in the same unit basis as the endpoints.
        endpoints: the source models, already aligned to the merged basis (e.g. ``to_basis(m, structure,
            alignment.perms[i])``).
        data: batches ``x`` or ``(x, y)`` to measure statistics on (same samples on every pass).
        coefficients: the interpolation weights ``λ_i`` (uniform by default).
        max_batches: use at most this many batches per pass.

    Returns:
        A corrected copy of ``merged`` (same architecture, plain weights); the inputs are untouched.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> a, b = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), nn.Sequential(
        ...     nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> from mergelab.merge.average import average
        >>> fixed = repair(average([a, b]), [a, b], [torch.randn(32, 4)])
    """
    endpoints = list(endpoints)
    if not endpoints:
        raise ValueError("repair: got no endpoints")
    check_same_architecture([merged, *endpoints], "repair")
    coefs = normalize_coefficients(coefficients, len(endpoints), "repair")
    model = copy.deepcopy(merged)
    sites = repair_sites(model)
    if not sites:
        logger.warning("repair: found no layer to correct in %s", type(merged).__name__)
        return model
    names = [n for n, _ in sites]
    goal_mean: dict[str, Tensor] = {}
    goal_std: dict[str, Tensor] = {}
    for lam, ep in zip(coefs, endpoints, strict=True):
        for n, (mu, sd) in channel_statistics(ep, names, data, max_batches=max_batches).items():
            goal_mean[n] = goal_mean.get(n, 0) + lam * mu
            goal_std[n] = goal_std.get(n, 0) + lam * sd
    with torch.no_grad():
        for name, kind in sites:
            mod = model.get_submodule(name)
            is_bn = kind == "bn"
            acc = _collect(model, [name], data, inputs=is_bn, max_batches=max_batches, stop_at=name)
            mean_m, var_m = acc[name].mean_var(name)
            mu_t, sd_t = goal_mean[name], goal_std[name]
            if is_bn:
                _fix_batchnorm(mod, mean_m, var_m, mu_t, sd_t)
            else:
                _fix_affine(name, mod, mean_m, var_m.sqrt(), mu_t, sd_t)
            logger.debug(
                "repair: %s site %r corrected (mean std %.4g → %.4g)",
                kind,
                name,
                float(var_m.sqrt().mean()),
                float(sd_t.mean()),
            )
    return model


def _fix_batchnorm(bn: _BatchNorm, mean_in: Tensor, var_in: Tensor, mu_t: Tensor, sd_t: Tensor) -> None:
    assert bn.running_mean is not None and bn.running_var is not None
    dtype = bn.weight.dtype
    bn.running_mean.copy_(mean_in.to(bn.running_mean))
    bn.running_var.copy_(var_in.to(bn.running_var))
    # eval output std = |w|·sqrt(var/(var+eps)); choose |w| so that it equals the target exactly.
    ratio = torch.where(
        var_in > 0, ((var_in + bn.eps) / var_in.clamp_min(1e-300)).sqrt(), torch.ones_like(var_in)
    )
    sign = torch.where(bn.weight.detach().double().cpu() < 0, -1.0, 1.0).double()
    w_new = torch.where(var_in > 0, sign * sd_t * ratio, bn.weight.detach().double().cpu())
    bn.weight.copy_(w_new.to(dtype=dtype, device=bn.weight.device))
    bn.bias.copy_(mu_t.to(dtype=dtype, device=bn.bias.device))


def _fix_affine(
    name: str, layer: nn.Module, mean_m: Tensor, std_m: Tensor, mu_t: Tensor, sd_t: Tensor
) -> None:
    w: Tensor = layer.weight  # (out, ...)
    scale = torch.where(
        std_m > 1e-12 * (std_m.max() + 1e-300), sd_t / std_m.clamp_min(1e-300), torch.ones_like(std_m)
    )
    shape = (-1,) + (1,) * (w.dim() - 1)
    w.mul_(scale.to(w).view(shape))
    bias = layer.bias
    if bias is None:
        logger.warning("repair: %r has no bias; only its scale is corrected", name)
        return
    new_b = (bias.detach().double().cpu() - mean_m) * scale + mu_t
    bias.copy_(new_b.to(bias))
