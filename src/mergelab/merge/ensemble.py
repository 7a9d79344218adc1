"""Output and feature ensembles: the "feature averaging" baselines that weight averaging is compared with.

An ensemble keeps every member and averages what they compute, instead of averaging their weights:

* ``mode="logits"``: the mean of the members' logits;
* ``mode="probs"``: the mean of their softmax probabilities, returned as *log*-probabilities so that
  ``cross_entropy`` / NLL on the output stay meaningful (``log_softmax`` of log-probabilities is a no-op);
* ``mode="features"``: the mean of the penultimate features (zoo models expose ``features(x)`` and ``head``),
  classified by one member's head (``head="first"``) or by the averaged head (``head="average"``).

Wang et al. (2024) argue that weight averaging of models in one basin behaves like feature averaging;
comparing a soup with these ensembles on the same pool tests that. Not a registered merge method: the
result holds all members, so it does not share the members' architecture.

Paper: Wang et al., "Rethinking Weight-Averaged Model-merging", 2024, https://arxiv.org/abs/2411.09263.
"""

from __future__ import annotations

import copy as _copy
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mergelab.evaluation import batches, eval_mode
from mergelab.structure.checks import normalize_coefficients

__all__ = ["ENSEMBLE_MODES", "Ensemble", "combine_outputs", "greedy_ensemble"]

EnsembleMode = Literal["logits", "probs", "features"]
HeadMode = Literal["first", "average"]
ENSEMBLE_MODES: tuple[str, ...] = ("logits", "probs", "features")


class Ensemble(nn.Module):
    """A model whose output averages several members' logits, probabilities or penultimate features.

    Args:
        models: one or more classifiers with the same number of outputs. ``mode="features"`` needs zoo-style
            members (a ``features(x)`` method and an ``nn.Linear`` ``head``) with equal feature width.
        mode: ``"logits"``, ``"probs"`` or ``"features"`` (see the module docstring).
        head: for ``mode="features"``: ``"first"`` uses member 0's head, ``"average"`` the (weighted) average
            of all heads (which then must have identical shapes).
        weights: optional non-negative member weights (normalised to sum to one); uniform by default.
        copy: deep-copy the members (default) so that the ensemble's ``eval()``/``train()`` or later edits
            never touch the caller's models.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> a, b = nn.Linear(3, 2), nn.Linear(3, 2)
        >>> ens = Ensemble([a, b], mode="logits")
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(ens(x), (a(x) + b(x)) / 2)
        True
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        mode: EnsembleMode = "logits",
        *,
        head: HeadMode = "first",
        weights: Sequence[float] | None = None,
        copy: bool = True,
    ) -> None:
        super().__init__()
        models = list(models)
        if not models:
            raise ValueError("Ensemble: got no models")
        if mode not in ENSEMBLE_MODES:
            raise ValueError(f"Ensemble: unknown mode {mode!r}; choose one of {list(ENSEMBLE_MODES)}")
        if head not in ("first", "average"):
            raise ValueError(f"Ensemble: unknown head {head!r}; use 'first' or 'average'")
        for i, m in enumerate(models):
            if not isinstance(m, nn.Module):
                raise TypeError(f"Ensemble: member {i} is a {type(m).__name__}, not an nn.Module")
        self.mode = mode
        self.head_mode = head
        coefs = normalize_coefficients(weights, len(models), "Ensemble")
        self.register_buffer("weights", torch.tensor(coefs, dtype=torch.float32), persistent=False)
        self.members = nn.ModuleList(_copy.deepcopy(m) if copy else m for m in models)
        self.head: nn.Linear | None = None
        if mode == "features":
            heads = _check_feature_members(self.members, average_head=head == "average")
            self.head = _copy.deepcopy(heads[0]) if head == "first" else _average_linear(heads, coefs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Weighted mean of the members' penultimate features, ``(N, D)``."""
        feats = []
        for i, m in enumerate(self.members):
            if not callable(getattr(m, "features", None)):
                raise TypeError(
                    f"Ensemble.features: member {i} ({type(m).__name__}) has no features(x) method"
                )
            feats.append(m.features(x))
        return _weighted_mean(feats, self.weights, "features")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "features":
            assert self.head is not None
            return self.head(self.features(x))  # (N, D) -> (N, classes)
        outs = [m(x) for m in self.members]  # N_members x (N, classes)
        if self.mode == "logits":
            return _weighted_mean(outs, self.weights, "logits")
        return _log_mean_probs(outs, self.weights)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, head={self.head_mode!r}, members={len(self.members)}"


def greedy_ensemble(
    models: Sequence[nn.Module],
    heldout: Iterable,
    *,
    mode: EnsembleMode = "logits",
    head: HeadMode = "first",
) -> Ensemble:
    """Greedy ensemble selection: add members best-first while held-out accuracy does not drop.

    The ensemble analogue of the greedy soup: members are sorted by held-out accuracy; the ensemble starts as
    the best one and each next member is kept if the ensemble with it is at least as accurate on ``heldout``.
    Every member's held-out outputs are computed once, so selection costs one pass per member.

    Args:
        models: candidate members.
        heldout: loader of ``(x, y)`` batches (not the test set).
        mode: ensemble mode (see :class:`Ensemble`).
        head: head choice for ``mode="features"``; ``"first"`` is the best member's head.

    Returns:
        An :class:`Ensemble` of the kept members (best first). It carries ``selected`` (indices into
        ``models``, in the order added), ``member_accuracies`` and ``heldout_accuracy`` attributes.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
        >>> ens = greedy_ensemble([nn.Linear(3, 2), nn.Linear(3, 2)], data)
        >>> ens.selected[0] in (0, 1)
        True
    """
    models = list(models)
    if not models:
        raise ValueError("greedy_ensemble: got no models")
    probe = Ensemble(models, mode, head=head, copy=False)  # validates the members once
    del probe
    cache, y = _cache_outputs(models, heldout, mode)
    heads = [m.head for m in models] if mode == "features" else []

    def accuracy(idx: list[int]) -> float:
        sel_heads = [heads[i] for i in idx] if heads else None
        out = combine_outputs([cache[i] for i in idx], mode, heads=sel_heads, head=head)
        return (out.argmax(-1) == y).double().mean().item()

    accs = [accuracy([i]) for i in range(len(models))]
    order = sorted(range(len(models)), key=lambda i: -accs[i])
    kept, best = [order[0]], accs[order[0]]
    for i in order[1:]:
        acc = accuracy([*kept, i])
        if acc >= best:
            kept, best = [*kept, i], acc
    ens = Ensemble([models[i] for i in kept], mode, head=head)
    ens.selected = kept
    ens.member_accuracies = accs
    ens.heldout_accuracy = best
    return ens


@torch.no_grad()
def combine_outputs(
    outputs: Sequence[torch.Tensor],
    mode: EnsembleMode = "logits",
    *,
    heads: Sequence[nn.Linear] | None = None,
    head: HeadMode = "first",
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """The ensemble's output from the members' precomputed outputs, without running the members again.

    What :class:`Ensemble` computes, for callers that already hold every member's outputs on a dataset (greedy
    selection, studies comparing several modes on one pool): ``outputs`` are the members' logits for
    ``mode="logits"``/``"probs"`` and their penultimate features for ``mode="features"``.

    Args:
        outputs: one ``(N, C)`` (or ``(N, D)`` features) tensor per member.
        mode: as in :class:`Ensemble`.
        heads: the members' heads (``mode="features"`` only).
        head: ``"first"`` (``heads[0]``) or ``"average"``.
        weights: member weights, uniform by default.

    Returns:
        ``(N, C)`` logits (log-probabilities for ``mode="probs"``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> a, b = nn.Linear(3, 2), nn.Linear(3, 2)
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(combine_outputs([a(x), b(x)]), Ensemble([a, b])(x))
        True
    """
    outputs = list(outputs)
    if not outputs:
        raise ValueError("combine_outputs: got no outputs")
    if mode not in ENSEMBLE_MODES:
        raise ValueError(f"combine_outputs: unknown mode {mode!r}; choose one of {list(ENSEMBLE_MODES)}")
    coefs = normalize_coefficients(weights, len(outputs), "combine_outputs")
    w = torch.tensor(coefs)
    if mode == "logits":
        return _weighted_mean(outputs, w, "logits")
    if mode == "probs":
        return _log_mean_probs(outputs, w)
    if heads is None or len(heads) != len(outputs):
        raise ValueError("combine_outputs(mode='features'): needs one head per member")
    feats = _weighted_mean(outputs, w, "features")
    clf = heads[0] if head == "first" else _average_linear(list(heads), coefs)
    return clf(feats)


# -- helpers -------------------------------------------------------------------------------------------------


def _check_feature_members(members: Iterable[nn.Module], average_head: bool) -> list[nn.Linear]:
    heads: list[nn.Linear] = []
    for i, m in enumerate(members):
        if not callable(getattr(m, "features", None)):
            raise TypeError(
                f"Ensemble(mode='features'): member {i} ({type(m).__name__}) has no features(x) method; "
                "use a zoo model (mergelab.models.build_model) or mode='logits'"
            )
        h = getattr(m, "head", None)
        if not isinstance(h, nn.Linear):
            raise TypeError(
                f"Ensemble(mode='features'): member {i} ({type(m).__name__}) has no nn.Linear 'head'"
            )
        heads.append(h)
    ref = heads[0]
    for i, h in enumerate(heads[1:], start=1):
        if h.in_features != ref.in_features:
            raise ValueError(
                f"Ensemble(mode='features'): member {i} has {h.in_features} features vs {ref.in_features} in "
                "member 0; feature averaging needs members of one architecture"
            )
        if average_head and (h.weight.shape != ref.weight.shape or (h.bias is None) != (ref.bias is None)):
            raise ValueError(
                f"Ensemble(head='average'): 'head.weight' {tuple(h.weight.shape)} in member {i} vs "
                f"{tuple(ref.weight.shape)} in member 0"
            )
    return heads


def _average_linear(heads: Sequence[nn.Linear], coefs: Sequence[float]) -> nn.Linear:
    out = _copy.deepcopy(heads[0])
    with torch.no_grad():
        out.weight.copy_(sum(c * h.weight for c, h in zip(coefs, heads, strict=True)))
        if out.bias is not None:
            out.bias.copy_(sum(c * h.bias for c, h in zip(coefs, heads, strict=True)))
    return out


def _weighted_mean(tensors: Sequence[torch.Tensor], weights: torch.Tensor, what: str) -> torch.Tensor:
    shape = tensors[0].shape
    for i, t in enumerate(tensors[1:], start=1):
        if t.shape != shape:
            raise ValueError(f"Ensemble: member {i} gives {what} of shape {tuple(t.shape)} vs {tuple(shape)}")
    stacked = torch.stack(list(tensors))  # (M, N, C)
    w = weights.to(stacked.dtype).view(-1, *([1] * (stacked.ndim - 1)))
    return (w * stacked).sum(0)


def _log_mean_probs(logits: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    shape = logits[0].shape
    for i, t in enumerate(logits[1:], start=1):
        if t.shape != shape:
            raise ValueError(f"Ensemble: member {i} gives logits of shape {tuple(t.shape)} vs {tuple(shape)}")
    logp = torch.stack([F.log_softmax(t, dim=-1) for t in logits])  # (M, N, C)
    logw = torch.log(weights.to(logp.dtype)).view(-1, *([1] * (logp.ndim - 1)))
    return torch.logsumexp(logp + logw, dim=0)  # log sum_i w_i p_i, (N, C)


@torch.no_grad()
def _cache_outputs(
    models: Sequence[nn.Module], data: Iterable, mode: str
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per member: held-out logits (``logits``/``probs``) or features (``features``); plus the labels."""
    outs: list[list[torch.Tensor]] = [[] for _ in models]
    ys: list[torch.Tensor] = []
    with eval_mode(*models):
        for x, y in batches(data):
            if y is None:
                raise ValueError(
                    "greedy_ensemble: the held-out loader yields no labels; it must yield (x, y)"
                )
            ys.append(y)
            for i, m in enumerate(models):
                outs[i].append(m.features(x) if mode == "features" else m(x))
    if not ys:
        raise ValueError("greedy_ensemble: the held-out loader is empty")
    return [torch.cat(o) for o in outs], torch.cat(ys)
