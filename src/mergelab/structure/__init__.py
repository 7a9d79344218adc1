"""Permutation symmetries of networks: discover them from ``torch.export`` graphs, write them by hand, apply them;
and the :class:`Alignment` (per-group merge/unmerge matrices) that merges several networks in one unit basis.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from mergelab.structure import discover_structure, permute, random_permutations
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> s = discover_structure(net, torch.zeros(2, 4))
    >>> print(s)
    Structure: 1 groups
      0  (8 units)
        0.weight[0] (out)
        0.bias[0] (out)
        2.weight[1] (in)
    >>> twin = permute(net, s, random_permutations(s, 0))
"""

from __future__ import annotations

from mergelab.structure.alignment import (
    Alignment,
    apply_alignment,
    identity_alignment,
    merge_state_dicts,
    to_basis,
)
from mergelab.structure.build import (
    attention_axes,
    build_structure,
    check_structure,
    conv_axes,
    linear_axes,
    norm_axes,
    param_axis,
)
from mergelab.structure.discover import discover_structure, trace
from mergelab.structure.transform import (
    check_permutations,
    identity_permutations,
    invert_permutation,
    permute,
    permute_state_dict,
    permute_tensor,
    random_permutations,
    validate_permutation,
)
from mergelab.structure.types import Axis, Fixed, Group, Probe, Structure

__all__ = [
    "Alignment",
    "Axis",
    "Fixed",
    "Group",
    "Probe",
    "Structure",
    "apply_alignment",
    "attention_axes",
    "build_structure",
    "check_permutations",
    "check_structure",
    "conv_axes",
    "discover_structure",
    "identity_alignment",
    "identity_permutations",
    "invert_permutation",
    "linear_axes",
    "merge_state_dicts",
    "norm_axes",
    "param_axis",
    "permute",
    "permute_state_dict",
    "permute_tensor",
    "random_permutations",
    "to_basis",
    "trace",
    "validate_permutation",
]
