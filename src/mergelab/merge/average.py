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
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dicts[0].items():
        if v.is_floating_point():
            out[k] = sum(c * sd[k] for c, sd in zip(coefficients, state_dicts, strict=True))
        else:
            out[k] = v.clone()
    return out


@register_method("average", paper="https://arxiv.org/abs/2203.05482")
def average(
    models: Sequence[nn.Module], *, data: object = None, coefficients: Sequence[float] | None = None
) -> nn.Module:
    """Uniform or weighted average of the weights (a model soup), with no alignment."""
    del data
    check_same_architecture(models, "average")
    coefs = normalize_coefficients(coefficients, len(models), "average")
    merged = copy.deepcopy(models[0])
    merged.load_state_dict(average_state_dicts([m.state_dict() for m in models], coefs))
    return merged
