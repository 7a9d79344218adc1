"""Checks every merge of several models starts with: same architecture, valid averaging coefficients.

They live here, below ``match/`` and ``merge/``, because the lowest code that needs them is
:mod:`mergelab.structure.alignment` (an :class:`~mergelab.structure.alignment.Alignment` normalises its
coefficients, ``apply_alignment`` compares the models); they look only at models and numbers, never at a
:class:`~mergelab.structure.types.Structure`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["check_same_architecture", "normalize_coefficients"]


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
