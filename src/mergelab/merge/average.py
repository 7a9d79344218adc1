"""Plain (weighted) weight averaging: the identity correspondence between units."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from mergelab.merge.registry import register_method
from mergelab.structure.checks import check_same_architecture, normalize_coefficients


def average_state_dicts(
    state_dicts: Sequence[dict[str, torch.Tensor]], coefficients: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Weighted average of float tensors; integer buffers (BatchNorm's counter) come from the first."""
    return {k: average_tensors([sd[k] for sd in state_dicts], coefficients) for k in state_dicts[0]}


def average_tensors(tensors: Sequence[torch.Tensor], coefficients: Sequence[float]) -> torch.Tensor:
    """``Σ_i c_i t_i`` accumulated in order in at least float32, cast back to the first tensor's dtype; a
    non-floating tensor is copied from the first. The one kernel of in-memory and streamed averaging."""
    first = tensors[0]
    if not first.is_floating_point():
        return first.clone()
    work = torch.promote_types(first.dtype, torch.float32)
    acc = torch.mul(tensors[0].detach().to(work), coefficients[0])
    for c, t in zip(coefficients[1:], tensors[1:], strict=True):
        acc.add_(t.detach().to(work), alpha=c)
    return acc.to(first.dtype)


@register_method("average", paper="https://arxiv.org/abs/2203.05482")
def average(
    models: Sequence[nn.Module], *, data: object = None, coefficients: Sequence[float] | None = None
) -> nn.Module:
    """Uniform or weighted average of the weights (a model soup), with no alignment.

    Args:
        models: models of one architecture.
        data: unused (averaging reads no data).
        coefficients: averaging weights (uniform by default).
    """
    del data
    check_same_architecture(models, "average")
    coefs = normalize_coefficients(coefficients, len(models), "average")
    merged = copy.deepcopy(models[0])
    merged.load_state_dict(average_state_dicts([m.state_dict() for m in models], coefs))
    return merged
