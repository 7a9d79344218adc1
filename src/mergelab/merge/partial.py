"""Partial zipping and multi-head models: a merged trunk shared by several per-model branches.

ZipIt! (Stoica et al., ICLR 2024) merges a network only up to some layer and keeps the rest of every model as a
separate branch that reads the shared trunk through its unmerge matrix ``U_i``. Here that is one construction for
any :class:`~mergelab.structure.alignment.Alignment` (zip or permutation) and any traceable model:

* The *merged groups* must form a cut of the network: every tensor that produces a merged group's units
  (has an ``"out"`` axis there) may read only merged groups. :func:`merged_groups` picks the first ``L`` groups
  in forward order (or all up to a named group / module) and :func:`check_cut` says which tensor breaks the cut.
* Branch ``i`` is model ``i`` with its merged groups replaced by the merged basis: tensors that produce merged
  units get the merged value ``Σ_j T_j(W_j)`` (identical in every branch), the rest keep model ``i``'s weights
  with every merged input axis read through ``U_i`` (``W_i U_i``). Each branch is therefore a complete,
  consistent network; the classifier (no ``"out"`` axis) is always per branch.
* :class:`MultiHeadModel` traces branch 0 with ``torch.fx`` and computes every node whose inputs and weights are
  shared *once*, then the remaining nodes per branch, and returns the branches' outputs combined.

Output choice: ``combine="concat"`` (default) returns the branches' logits **concatenated** along the last axis
(model 0's classes first), so ``argmax`` is over the union of the tasks' classes and the usual ``evaluate``
works; :meth:`MultiHeadModel.forward_tasks` returns the tuple. ``combine="mean"`` returns the λ-weighted mean of
the branches' outputs — for models that share an output space; with all groups merged it equals the plain merged
model (the heads are linear, so averaging heads = averaging their outputs).

``L = all`` with ``"concat"`` is the full zip with one head per task; ``L = 0`` is the models side by side (the
output ensemble). :class:`ClassEmbeddingModel` is the other set-up for different tasks: every task classifies
against fixed class vectors, so the models share one output space and merge into a single head.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, fx, nn

from mergelab.match.context import check_compatible
from mergelab.match.features import trace_model
from mergelab.structure.alignment import Alignment, tensor_ops, transform_tensor
from mergelab.structure.types import Axis, Group, Structure

__all__ = [
    "ClassEmbeddingModel",
    "MultiHeadModel",
    "branch_state_dicts",
    "build_multihead",
    "check_compatible",
    "check_cut",
    "class_embeddings",
    "merged_groups",
]

logger = logging.getLogger(__name__)

Combine = Literal["concat", "mean"]


# --------------------------------------------------------------------------------------------------- the cut


def merged_groups(structure: Structure, partial: int | str | None = None) -> tuple[str, ...]:
    """The groups a partial zip merges: the first ``partial`` groups in forward order.

    Args:
        structure: the network's groups (in forward order).
        partial: ``None`` = all groups; an int ``L`` in ``[0, len(structure)]`` = the first ``L``; a group name
            or a module name (e.g. ``"layers.2"``) = every group up to and including the one that module produces.

    Returns:
        Names of the merged groups, in structure order.

    Example:
        >>> from mergelab.structure.types import Axis, Group, Structure
        >>> s = Structure((Group("a", 2, (Axis("a.weight", 0, "out"),)), Group("b", 2, (Axis("b.weight", 0, "out"),))))
        >>> merged_groups(s, 1), merged_groups(s, "b")
        (('a',), ('a', 'b'))
    """
    names = [g.name for g in structure]
    if partial is None:
        return tuple(names)
    if isinstance(partial, bool) or not isinstance(partial, (int, str)):
        raise TypeError(f"partial={partial!r}: give a number of groups (int) or a group/module name (str)")
    if isinstance(partial, int):
        if not 0 <= partial <= len(names):
            raise ValueError(
                f"partial={partial}: must be in [0, {len(names)}] (the network has {len(names)} groups)"
            )
        return tuple(names[:partial])
    if partial in names:
        return tuple(names[: names.index(partial) + 1])
    last = -1
    for idx, g in enumerate(structure):
        if any(a.role == "out" and a.param.rsplit(".", 1)[0] == partial for a in g.axes):
            last = idx
    if last < 0:
        raise ValueError(
            f"partial={partial!r} names no group and no module that produces one; groups: {names}"
        )
    return tuple(names[: last + 1])


def _shared_params(structure: Structure, merged: Sequence[str]) -> set[str]:
    """Tensors with an ``"out"`` axis in a merged group (their merged value is the same in every branch)."""
    m = set(merged)
    return {
        p
        for p, items in structure.param_axes.items()
        if any(a.role == "out" and g.name in m for g, a in items)
    }


def check_cut(structure: Structure, merged: Sequence[str]) -> None:
    """Raise ``ValueError`` unless every tensor producing merged units reads merged groups only.

    Args:
        structure: the network's groups.
        merged: names of the merged groups.
    """
    unknown = set(merged) - {g.name for g in structure}
    if unknown:
        raise ValueError(f"partial zipping: unknown groups {sorted(unknown)}")
    m = set(merged)
    for param, items in structure.param_axes.items():
        produces = [g.name for g, a in items if a.role == "out" and g.name in m]
        outside = [g.name for g, _ in items if g.name not in m]
        if produces and outside:
            raise ValueError(
                f"partial zipping: {param!r} produces merged group {produces[0]!r} but also touches unmerged "
                f"group(s) {outside}; the merged groups must be a prefix of the network (a cut) — merge "
                f"{outside[0]!r} too, or stop before {produces[0]!r}"
            )


# --------------------------------------------------------------------------------------------------- weights


def _merged_value(tensors: Sequence[Tensor], items: Sequence[tuple[Group, Axis]], al: Alignment) -> Tensor:
    """``Σ_i T_i(W_i)`` for one tensor with an ``"out"`` axis (first out axis through ``M_i``, the rest ``U_iᵀ``)."""
    total: Tensor | None = None
    for i, w in enumerate(tensors):
        t = transform_tensor(w, tensor_ops(items, al, i))
        total = t if total is None else total + t
    assert total is not None
    return total


def branch_state_dicts(
    models: Sequence[nn.Module], alignment: Alignment, merged: Sequence[str]
) -> tuple[list[dict[str, Tensor]], set[str]]:
    """The weights of every branch of a partial merge, and which tensors all branches share.

    Args:
        models: the source models, in the alignment's order.
        alignment: their correspondence (merged width = model width in the merged groups).
        merged: names of the merged groups (a cut; see :func:`check_cut`).

    Returns:
        ``(state_dicts, shared)``: one state dict per branch (same keys and shapes as the models) and the names
        of the tensors whose values are identical in every branch.
    """
    structure = alignment.structure
    if len(models) != alignment.num_models:
        raise ValueError(f"partial merge: {len(models)} models for an alignment of {alignment.num_models}")
    check_cut(structure, merged)
    for g in structure:
        if g.name in merged and alignment.width(g.name) != g.size:
            raise ValueError(
                f"partial merge: group {g.name!r} merges into k={alignment.width(g.name)} units, not its {g.size}"
            )
    check_compatible(models, structure, "partial merge")
    shared = _shared_params(structure, merged)
    axes = structure.param_axes
    m = set(merged)
    sds = [mod.state_dict() for mod in models]
    out: list[dict[str, Tensor]] = [{} for _ in models]
    with torch.no_grad():
        for key, v0 in sds[0].items():
            items = axes.get(key, [])
            if key in shared:
                value = (
                    _merged_value([sd[key] for sd in sds], items, alignment) if v0.is_floating_point() else v0
                )
                for sd_out in out:
                    sd_out[key] = value.to(v0.dtype).clone()
                continue
            for i, sd in enumerate(sds):
                w = sd[key]
                ops = [(a, alignment.unmerges[g.name][i].T) for g, a in items if g.name in m]
                out[i][key] = (
                    transform_tensor(w, ops).to(w.dtype) if ops and w.is_floating_point() else w.clone()
                )
    return out, shared


# --------------------------------------------------------------------------------------------------- the model


class MultiHeadModel(nn.Module):
    """A shared merged trunk and one branch per source model (see the module docstring).

    Attributes:
        net: the ``torch.fx`` graph module computing the tuple of branch outputs.
        combine: ``"concat"`` or ``"mean"``.
        merged_groups: the groups merged into the trunk.
    """

    def __init__(
        self, net: fx.GraphModule, combine: Combine, weights: Sequence[float], merged: Sequence[str]
    ):
        super().__init__()
        if combine not in ("concat", "mean"):
            raise ValueError(f"MultiHeadModel: combine={combine!r}; choose 'concat' or 'mean'")
        self.net = net
        self.combine = combine
        self.merged_groups = tuple(merged)
        self.register_buffer("weights", torch.tensor(list(weights), dtype=torch.float32), persistent=False)

    @property
    def num_branches(self) -> int:
        return int(self.weights.numel())

    def forward_tasks(self, x: Tensor) -> tuple[Tensor, ...]:
        """Every branch's output (one per source model / task)."""
        return tuple(self.net(x))

    def forward(self, x: Tensor) -> Tensor:
        outs = self.forward_tasks(x)
        if self.combine == "concat":
            return torch.cat(outs, dim=-1)
        return sum(w * o for w, o in zip(self.weights.tolist(), outs, strict=True))  # type: ignore[return-value]


def _module_keys(sd_keys: Sequence[str], target: str) -> list[str]:
    prefix = target + "."
    return [k for k in sd_keys if k.startswith(prefix)]


def _shared_nodes(gm: fx.GraphModule, shared: set[str]) -> set[fx.Node]:
    """Nodes computing the same value in every branch: shared inputs and only shared state."""
    keys = list(gm.state_dict())
    out: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        if node.op == "placeholder":
            out.add(node)
            continue
        if not all(n in out for n in node.all_input_nodes):
            continue
        if node.op == "call_module":
            state = _module_keys(keys, node.target)
            if not all(k in shared for k in state):
                continue
        elif node.op == "get_attr" and node.target not in shared:
            state = _module_keys(keys, node.target)
            if not state or not all(k in shared for k in state):
                continue
        out.add(node)
    return out


def _combined_graph(branches: Sequence[fx.GraphModule], shared: set[str]) -> tuple[fx.Graph, int]:
    """One graph: the shared nodes once (on branch 0's modules), then each branch's other nodes."""
    g0 = branches[0].graph
    common = _shared_nodes(branches[0], shared)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}

    def copy_node(node: fx.Node, mapping: dict[fx.Node, fx.Node], i: int) -> fx.Node:
        new = graph.node_copy(node, lambda n: mapping[n])
        if node.op in ("call_module", "get_attr"):
            new.target = f"branches.{i}.{node.target}"
        return new

    output = None
    for node in g0.nodes:
        if node.op == "output":
            output = node
        elif node in common:
            env[node] = copy_node(node, env, 0)
    assert output is not None
    results = []
    for i in range(len(branches)):
        local = dict(env)
        for node in g0.nodes:
            if node.op != "output" and node not in common:
                local[node] = copy_node(node, local, i)
        results.append(fx.node.map_arg(output.args[0], lambda n, local=local: local[n]))
    graph.output(tuple(results))
    n_common = sum(1 for n in common if n.op != "placeholder")
    return graph, n_common


def build_multihead(
    models: Sequence[nn.Module],
    alignment: Alignment,
    merged: Sequence[str] | int | str | None = None,
    *,
    combine: Combine = "concat",
) -> MultiHeadModel:
    """A partial (or full) merge with one branch per model: the shared trunk is computed once.

    Args:
        models: the source models, in the alignment's order (same architecture; heads may differ in size when
            ``combine="concat"``).
        alignment: their correspondence (zip or permutation).
        merged: the merged groups — names, or anything :func:`merged_groups` accepts (``None`` = all).
        combine: ``"concat"`` (logits of all branches side by side) or ``"mean"`` (λ-weighted mean of outputs).

    Returns:
        A :class:`MultiHeadModel` (new modules; the inputs are untouched).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mergelab.structure.alignment import identity_alignment
        >>> from mergelab.structure import discover_structure
        >>> a, b = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> s = discover_structure(a, torch.zeros(2, 4))
        >>> mh = build_multihead([a, b], identity_alignment(s, 2), merged=0)
        >>> x = torch.randn(5, 4)
        >>> torch.allclose(mh(x), torch.cat([a(x), b(x)], 1))
        True
    """
    models = list(models)
    names = merged if isinstance(merged, (list, tuple)) else merged_groups(alignment.structure, merged)
    sds, shared = branch_state_dicts(models, alignment, names)
    if combine == "mean":
        bad = [k for k in sds[0] if len({tuple(sd[k].shape) for sd in sds}) != 1]
        if bad:
            raise ValueError(f"build_multihead: combine='mean' needs equal output shapes; {bad[0]!r} differs")
    copies = []
    for m, sd in zip(models, sds, strict=True):
        c = copy.deepcopy(m)
        c.load_state_dict(sd)
        c.eval()
        copies.append(c)
    branches = [trace_model(c) for c in copies]
    graph, n_common = _combined_graph(branches, shared)
    root = nn.Module()
    root.branches = nn.ModuleList(branches)
    net = fx.GraphModule(root, graph, class_name="MultiHeadNet")
    logger.info(
        "build_multihead: %d merged groups, %d shared nodes, %d branches", len(names), n_common, len(models)
    )
    model = MultiHeadModel(net, combine, alignment.coefficients, names)
    specs = [getattr(m, "mergelab_spec", None) for m in models]
    if all(specs):  # zoo sources: record how to rebuild this model, so a saved checkpoint loads again
        model.mergelab_spec = {
            "kind": "multihead",
            "branches": specs,
            "combine": combine,
            "weights": [float(w) for w in alignment.coefficients],
            "merged_groups": list(names),
            "shared": sorted(shared),
        }
    model.eval()
    return model


def multihead_from_spec(spec: dict) -> MultiHeadModel:
    """An untrained :class:`MultiHeadModel` of the layout a ``build_multihead`` spec records (for loading).

    The branches are rebuilt from their zoo specs and traced and combined exactly as when merging, so the saved
    state dict fits; the weights come from the checkpoint.
    """
    from mergelab.models import build_from_spec

    try:
        copies = [build_from_spec(s).eval() for s in spec["branches"]]
        shared = set(spec["shared"])
        branches = [trace_model(c) for c in copies]
        graph, _ = _combined_graph(branches, shared)
        root = nn.Module()
        root.branches = nn.ModuleList(branches)
        net = fx.GraphModule(root, graph, class_name="MultiHeadNet")
        model = MultiHeadModel(net, spec["combine"], spec["weights"], spec["merged_groups"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"multihead_from_spec: incomplete spec ({e!r})") from None
    model.mergelab_spec = dict(spec)
    return model.eval()


# --------------------------------------------------------------------------------------------------- heads


def class_embeddings(num_classes: int, dim: int, seed: int = 0) -> Tensor:
    """A fixed random orthonormal class-embedding matrix ``(num_classes × dim)``: rows are unit, orthogonal.

    Args:
        num_classes: classes over all tasks.
        dim: embedding dimension (``>= num_classes``).
        seed: the matrix's seed (every task and model must use the same one).

    Example:
        >>> e = class_embeddings(10, 16)
        >>> bool(torch.allclose(e @ e.T, torch.eye(10), atol=1e-5))
        True
    """
    if dim < num_classes:
        raise ValueError(
            f"class_embeddings: dim={dim} < num_classes={num_classes}; rows cannot be orthonormal"
        )
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, num_classes, generator=gen, dtype=torch.float64))
    return q.T.contiguous().float()  # (num_classes, dim)


class ClassEmbeddingModel(nn.Module):
    """Logits = ``net(x) @ class_vectorsᵀ``: a learned projection (``net``'s last layer) onto fixed class vectors.

    ZipIt!'s set-up for merging models of different tasks (with CLIP text embeddings there; here a frozen
    random orthonormal matrix, :func:`class_embeddings`): every model embeds into the same space, so a merge
    of their ``net`` s (heads averaged like any other tensor) classifies against the union of the tasks' class
    vectors.

    Args:
        net: a model whose output is the embedding (e.g. a zoo model built with ``num_classes=dim``).
        class_vectors: (C × dim) fixed class vectors of the classes this model predicts, in output order.
    """

    def __init__(self, net: nn.Module, class_vectors: Tensor) -> None:
        super().__init__()
        if class_vectors.dim() != 2:
            raise ValueError(
                f"ClassEmbeddingModel: class_vectors must be (classes × dim), got {tuple(class_vectors.shape)}"
            )
        self.net = net
        self.register_buffer("class_vectors", class_vectors.detach().clone().float())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) @ self.class_vectors.T  # (N, dim) @ (dim, C) -> (N, C)
