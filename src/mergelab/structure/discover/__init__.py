"""Discover a network's permutation symmetries from its ``torch.export`` graph.

:func:`discover_structure` exports the model (non-strict, so any Python forward that runs once exports) into a
graph of ATen ops and propagates *unit bases* through it:

* **Bases** (:mod:`.bases`): a union-find over sets of units that also splits (a slice keeps its parts in
  place), coarsens (units glued into runs: a head whose inner dims cannot move) and blocks (attention heads,
  GroupNorm groups). Layouts say which bases lie along a tensor axis, piece after piece.
* **Values** (:mod:`.values`): each node's output is an activation with layouts on some axes — and, for
  attention, *pairs*: a within-head axis whose units depend on the head axis next to it — a view of a
  parameter, or a plain Python value.
* **Rules** (:mod:`.rules`): one rule per ATen op family (elementwise, shape, dense, conv, norm, attention,
  embedding) registered in one table. A tracked tensor reaching an op without a rule raises ``ValueError``
  naming the op, the module and the node. Known ops whose constraint the ``Axis``/``blocks`` vocabulary
  cannot express keep the affected units fixed; the :class:`~mergelab.structure.types.Structure` records
  each fixed set with its reason (``structure.explain()``, ``structure.coverage()``).
* **Probes** (:mod:`.finish`): groups are observed with forward hooks on the eager model — the input of
  every leaf module that reads the group (a residual stream is sampled at each reader), else the output of
  the leaf module that produces it — so activation statistics need no graph at all.

References: Git Re-Basin's ``PermutationSpec`` (Ainsworth et al., ICLR 2023, https://arxiv.org/abs/2209.04836)
writes the same information by hand per architecture; Torch-Pruning's dependency graph (Fang et al., CVPR 2023,
https://arxiv.org/abs/2301.12900) follows channel dependencies through residuals and concats.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mergelab.structure.build import check_structure
from mergelab.structure.discover.rules import RULES
from mergelab.structure.discover.trace import trace
from mergelab.structure.discover.walk import Walk
from mergelab.structure.types import Structure

__all__ = ["RULES", "discover_structure", "export_model", "trace"]

ExampleInput = Tensor | Sequence[Any] | Mapping[str, Any]


def _split_input(example_input: ExampleInput) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_input, Tensor):
        return (example_input,), {}
    if isinstance(example_input, Mapping):
        return (), dict(example_input)
    return tuple(example_input), {}


def export_model(model: nn.Module, example_input: ExampleInput) -> torch.export.ExportedProgram:
    """``torch.export.export(model, ..., strict=False)`` in eval mode (train modes are restored).

    Raises:
        ValueError: the model does not export with this input (the message names the exception).
    """
    args, kwargs = _split_input(example_input)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(model, args, kwargs, strict=False)
    except Exception as err:  # export raises many exception types
        shapes = [tuple(t.shape) for t in (*args, *kwargs.values()) if isinstance(t, Tensor)]
        raise ValueError(
            f"discover_structure: exporting {type(model).__name__} with inputs {shapes} failed "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Check the example input, or "
            "write its Structure by hand with mergelab.structure.build_structure(model, linear_axes(...), ...)"
        ) from err
    finally:
        for m, mode in modes.items():
            m.training = mode


def discover_structure(model: nn.Module, example_input: ExampleInput) -> Structure:
    """Find the permutation symmetries of ``model`` from its exported graph.

    Args:
        model: any module that ``torch.export`` can export non-strictly (mergelab's zoo, Hugging Face
            transformers built with ``use_cache=False``, torchvision/timm-style CNNs and ViTs). It is not
            modified; its train mode is restored afterwards.
        example_input: one batch *with* the batch axis: a tensor, a tuple of positional inputs, or a dict of
            keyword inputs (``{"input_ids": ids, "attention_mask": mask}``).

    Returns:
        The :class:`Structure`: groups in forward order, each named after the module producing its units; what
        is kept fixed, and why, is in ``structure.fixed`` (``print(structure.explain())``).

    Raises:
        ValueError: export fails, or a tensor carrying units meets an op without a rule (the message names the
            op, the node and the module).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> s = discover_structure(net, torch.zeros(2, 4))
        >>> [(g.name, g.size) for g in s]
        [('0', 8)]
        >>> [str(a) for a in s["0"].axes]
        ['0.weight[0] (out)', '0.bias[0] (out)', '2.weight[1] (in)']
        >>> s.coverage()
        1.0
    """
    ep = export_model(model, example_input)
    structure = Walk(model, ep, RULES).run()
    check_structure(structure, model, "discover_structure")
    return structure
