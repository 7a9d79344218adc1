"""Plain (weighted) weight averaging: the identity correspondence between units."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from mergelab.merge.registry import register_method


def check_same_architecture(models: Sequence[nn.Module], op: str = "merge") -> None:
    """Raise a ``ValueError`` naming the first tensor that differs between the models' state dicts."""
    if len(models) < 1:
        raise ValueError(f"{op}: got no models")
    ref = models[0].state_dict()
    for i, m in enumerate(models[1:], start=1):
        sd = m.state_dict()
        missing, extra = sorted(set(ref) - set(sd)), sorted(set(sd) - set(ref))
        if missing or extra:
            raise ValueError(
                f"{op}: model {i} does not share model 0's architecture "
                f"(missing {missing[:3]}, unexpected {extra[:3]})"
            )
        for k, v in ref.items():
            if v.shape != sd[k].shape:
                raise ValueError(
                    f"{op}: {k!r} {tuple(sd[k].shape)} in model {i} vs {tuple(v.shape)} in model 0"
                )


def normalize_coefficients(coefficients: Sequence[float] | None, n: int, op: str = "merge") -> list[float]:
    """Uniform weights by default; otherwise ``n`` non-negative weights rescaled to sum to one."""
    if coefficients is None:
        return [1.0 / n] * n
    coefs = [float(c) for c in coefficients]
    if len(coefs) != n:
        raise ValueError(f"{op}: {len(coefs)} coefficients for {n} models")
    if any(c < 0 for c in coefs) or sum(coefs) <= 0:
        raise ValueError(f"{op}: coefficients must be non-negative and not all zero, got {coefs}")
    total = sum(coefs)
    return [c / total for c in coefs]


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
