"""Git Re-Basin weight matching: coordinate descent of LAPs over ties, for two models and for N (MergeMany).

Conventions: a solved permutation ``perm`` of model ``b`` says merged unit ``j`` (= the reference's unit ``j``)
is model ``b``'s unit ``perm[j]``; :class:`~mergelab.structure.alignment.Alignment` stores it as ``M = λ P`` with
``P[j, perm[j]] = 1``.

Git Re-Basin's coordinate descent with three changes (see ``docs/alignment.md`` for the measurements):

* each LAP is solved exactly by :func:`~mergelab.match.lap.solve_lap_warm`: from 768 units on, on a sparse
  candidate set with an LP dual certificate, warm-started from the dual prices of the group's previous solve;
* the stopping rule: stop after the first iteration whose objective gain is at most ``tol`` relative,
  ``obj_t − obj_{t−1} ≤ tol·|obj_{t−1}|`` (default ``DEFAULT_TOL = 1e-4``), or that changes nothing.
  ``tol=0`` is Git Re-Basin's rule (run until an iteration changes no permutation).
* a second start (``start="best"``): one forward sweep that solves each tie only from terms whose neighbours are
  fixed or already solved; kept when it reaches the Cauchy-Schwarz bound, or for a related pair (aligned cosine
  ≥ 0.5) when it scores higher than descent from the identity ends. From the identity alone, the first LAPs fit
  the noise of neighbours in an arbitrary order and lock descent in poor optima: permuted copies of depthwise +
  squeeze-excite nets were not recovered.

References:
    Ainsworth, Hayase, Srinivasa. Git Re-Basin: Merging Models modulo Permutation Symmetries. ICLR 2023.
    https://arxiv.org/abs/2209.04836 (weight matching, MergeMany).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from mergelab.match.context import MatchContext, check_models
from mergelab.match.lap import (
    IMPROVEMENT_RTOL,
    LapMethod,
    LapState,
    Perms,
    assignment_value,
    identity_perms,
    solve_tie_warm,
)
from mergelab.match.registry import register_solver
from mergelab.match.similarity import WeightSimilarity, float_parameters, weight_objective
from mergelab.structure.alignment import Alignment
from mergelab.structure.checks import check_same_architecture
from mergelab.structure.transform import permute_tensor
from mergelab.structure.types import Structure

__all__ = ["DEFAULT_TOL", "StartKind", "match_weights", "match_weights_many", "weight_solver"]

logger = logging.getLogger(__name__)

# Default stopping tolerance of weight matching (relative objective gain of one iteration); 0 = run until an
# iteration changes nothing, as in Git Re-Basin. Measured (docs/alignment.md): for digits MLPs 3×128…3×2048 the
# mean barrier over 4 visiting orders moves by ≤ 3 % (< 1 std of the orders' spread) against tol=0, while
# 1e-3 already costs up to 8 %.
DEFAULT_TOL = 1e-4

# A start whose objective is within this (relative) margin of the Cauchy-Schwarz bound is the global optimum
# (float32 round-off of the sums is ~1e-7).
_OPTIMAL_RTOL = 1e-6
# start="best" trusts the propagated start only for a *related* pair: objective / Cauchy-Schwarz bound (the cosine
# of the aligned weight vectors) at least this. Permuted (near-)copies score ~1; independently trained digits
# MLPs 0.21-0.31, where descent from the identity gives lower barriers even when the propagated start scores
# higher on the objective (docs/alignment.md §5).
_RELATED_COSINE = 0.5

StartKind = Literal["best", "identity", "propagate"]


def _relative_gain(before: float, after: float) -> float:
    """``(after − before) / |before|`` (infinite for a gain from zero)."""
    if before == 0.0:
        return math.inf if after > 0.0 else 0.0
    return (after - before) / abs(before)


def _objective_bound(params_a: Mapping[str, Tensor], params_b: Mapping[str, Tensor]) -> float:
    """``Σ_params ‖W_a‖·‖W_b‖``: no permutation scores higher (Cauchy-Schwarz); a permuted copy reaches it."""
    return sum(
        float(
            torch.linalg.vector_norm(v, dtype=torch.float64)
            * torch.linalg.vector_norm(params_b[k], dtype=torch.float64)
        )
        for k, v in params_a.items()
    )


def _uninformative(similarity: Tensor) -> bool:
    """Whether every assignment scores the same: ``S[i, j] = r_i + c_j`` (e.g. all-ones norm weights, zero biases).

    A LAP on such a matrix returns an arbitrary permutation; keeping the current one is as good and honest.
    """
    s = similarity.detach().cpu().numpy()  # numpy: one pass, no thread start-up for a small matrix
    resid = s - s.mean(1, keepdims=True) - s.mean(0, keepdims=True) + s.mean()
    return bool(np.abs(resid).max() <= 1e-6 * max(float(np.abs(s).max()), 1e-30))


def _propagate(
    structure: Structure,
    sim: WeightSimilarity,
    perms: Perms,
    lap_states: dict[tuple[str, ...], LapState | None],
    lap: LapMethod,
) -> tuple[int, float, float]:
    """The starting point of weight matching: one forward sweep that only trusts what is already known.

    Each tie is solved in forward order on :meth:`WeightSimilarity.partial` with the ties solved before it as
    ``known``: the terms against fixed axes, its own per-unit parameters and solved neighbours, never against a
    neighbour whose permutation is still the arbitrary identity. A tie with no such term keeps the identity.
    Updates ``perms`` and ``lap_states`` in place; returns (LAPs solved, similarity seconds, LAP seconds).
    """
    known: set[str] = set()
    solves, t_sim, t_lap = 0, 0.0, 0.0
    for tie in structure.tie_sets():
        t0 = time.perf_counter()
        parts = [sim.partial(g, perms, known) for g in tie]
        t1 = time.perf_counter()
        t_sim += t1 - t0
        known.update(tie)
        if all(p is None or _uninformative(p) for p in parts):
            continue
        sims = [
            p if p is not None else torch.zeros(structure[g].size, structure[g].size)
            for g, p in zip(tie, parts, strict=True)
        ]
        new, lap_states[tie] = solve_tie_warm(structure, tie, sims, None, lap)
        t_lap += time.perf_counter() - t1
        solves += 1
        for g, p in zip(tie, new, strict=True):
            perms[g] = p
    return solves, t_sim, t_lap


@dataclass
class _Descent:
    """One run of coordinate descent: its permutations, objective after each iteration, and its cost."""

    perms: Perms
    history: list[float]
    iterations: int = 0
    stopped: str = "max_iter"
    solves: int = 0
    t_sim: float = 0.0
    t_lap: float = 0.0


def _descend(
    structure: Structure,
    sim: WeightSimilarity,
    perms: Perms,
    *,
    max_iter: int,
    seed: int,
    tol: float,
    lap: LapMethod,
    lap_states: dict[tuple[str, ...], LapState | None] | None = None,
) -> _Descent:
    """Coordinate descent of LAPs over ties in random order from ``perms`` until an iteration changes nothing
    (or gains at most ``tol`` relative)."""
    params_a, params_b = sim.params_a, sim.params_b
    ties = structure.tie_sets()
    lap_states = {} if lap_states is None else lap_states
    deps = {t: set().union(*(sim.dependencies(g) for g in t)) for t in ties}
    snapshot: dict[tuple[str, ...], dict[str, Tensor]] = {}
    gen = torch.Generator().manual_seed(seed)
    # The objective changes by exactly the tie's gain when no tensor has two axes in one tie, so it is tracked
    # incrementally (one exact evaluation at each end); otherwise it is recomputed after every iteration.
    incremental = all(
        len([1 for h, _ in sim.axes[k] if structure.tie_of(h.name) == structure.tie_of(g.name)]) == 1
        for k in sim.axes
        for g, _ in sim.axes[k]
    )
    objective = weight_objective(structure, params_a, params_b, perms)
    run = _Descent(perms, [objective])
    for it in range(max_iter):
        run.iterations = it + 1
        progress = False
        for ti in torch.randperm(len(ties), generator=gen).tolist():
            tie = ties[ti]
            snap = snapshot.get(tie)
            if snap is not None and all(torch.equal(snap[h], perms[h]) for h in snap):
                continue  # nothing it depends on moved: its assignment is still optimal
            snapshot[tie] = {h: perms[h].clone() for h in deps[tie]}
            t0 = time.perf_counter()
            sims = [sim(g, perms) for g in tie]
            t1 = time.perf_counter()
            new, lap_states[tie] = solve_tie_warm(structure, tie, sims, lap_states.get(tie), lap)
            run.t_lap += time.perf_counter() - t1
            run.t_sim += t1 - t0
            run.solves += 1
            old_v, new_v = assignment_value(sims, [perms[g] for g in tie]), assignment_value(sims, new)
            if new_v > old_v + IMPROVEMENT_RTOL * max(1.0, abs(old_v)):
                for g, p in zip(tie, new, strict=True):
                    perms[g] = p
                progress = True
                objective += new_v - old_v
        if not incremental:
            objective = weight_objective(structure, params_a, params_b, perms)
        run.history.append(objective)
        logger.info("weight matching: iteration %d, objective %.6g", run.iterations, run.history[-1])
        if not progress:
            run.stopped = "unchanged"
            break
        if _relative_gain(run.history[-2], run.history[-1]) <= tol:
            run.stopped = "tol"
            break
    if run.stopped == "max_iter":
        logger.warning("weight matching: not converged after max_iter=%d iterations", max_iter)
    if incremental:
        run.history[-1] = weight_objective(structure, params_a, params_b, perms)
    return run


def _weight_matching(
    structure: Structure,
    params_a: Mapping[str, Tensor],
    params_b: Mapping[str, Tensor],
    *,
    max_iter: int,
    seed: int,
    init: Mapping[str, Tensor] | None = None,
    tol: float = 0.0,
    lap: LapMethod = "auto",
    start: StartKind = "best",
) -> tuple[Perms, dict]:
    """Weight matching from ``init`` if given, else from the start(s) ``start`` names (see :func:`match_weights`)."""
    if max_iter < 1:
        raise ValueError(f"weight matching: max_iter must be >= 1, got {max_iter}")
    if not tol >= 0.0:
        raise ValueError(f"weight matching: tol must be >= 0, got {tol}")
    if start not in ("best", "identity", "propagate"):
        raise ValueError(f"weight matching: start={start!r}; choose 'best', 'identity' or 'propagate'")
    sim = WeightSimilarity(structure, params_a, params_b)
    kw = {"max_iter": max_iter, "seed": seed, "tol": tol, "lap": lap}
    starts: dict[str, float] = {}  # the objective each start reached
    made: list[_Descent] = []  # every descent run, for the cost in info
    sweep = (0, 0.0, 0.0)  # the propagation sweep's cost: LAPs, similarity s, LAP s
    if init:
        perms = identity_perms(structure)
        perms.update({k: torch.as_tensor(v, dtype=torch.long).clone() for k, v in init.items()})
        run, used = _descend(structure, sim, perms, **kw), "init"
        made.append(run)
    elif start == "identity":
        run, used = _descend(structure, sim, identity_perms(structure), **kw), "identity"
        made.append(run)
    else:
        prop, states = identity_perms(structure), {}
        sweep = _propagate(structure, sim, prop, states, lap)
        starts["propagate"] = weight_objective(structure, params_a, params_b, prop)
        bound = _objective_bound(params_a, params_b)
        use_propagated = start == "propagate"
        if starts["propagate"] >= (1.0 - _OPTIMAL_RTOL) * bound:
            # the Cauchy-Schwarz bound is reached (a permuted copy): the global optimum, nothing to descend
            run, used = _Descent(prop, [starts["propagate"]], stopped="optimal"), "propagate"
            use_propagated = False
        elif start == "best":
            # Git Re-Basin's start first; the propagated one replaces it only for a related pair (aligned cosine
            # ≥ _RELATED_COSINE) and only if it already scores higher than where descent from the identity ends
            # (descent never lowers the objective, so it can only end higher).
            run, used = _descend(structure, sim, identity_perms(structure), **kw), "identity"
            made.append(run)
            starts["identity"] = run.history[-1]
            margin = IMPROVEMENT_RTOL * max(1.0, abs(run.history[-1]))
            use_propagated = (
                starts["propagate"] >= _RELATED_COSINE * bound
                and starts["propagate"] > run.history[-1] + margin
            )
        if use_propagated:
            run, used = _descend(structure, sim, prop, lap_states=states, **kw), "propagate"
            made.append(run)
            starts["propagate"] = run.history[-1]
    if len(starts) > 1:
        logger.info("weight matching: objective from each start %s; kept %r", starts, used)
    info = {
        "objective": run.history,
        "iterations": run.iterations,
        "converged": run.stopped != "max_iter",
        "stopped": run.stopped,
        "tol": tol,
        "lap": lap,
        "start": used,
        "starts": starts,
        "solves": sweep[0] + sum(r.solves for r in made),
        "seconds": {
            "similarity": sweep[1] + sum(r.t_sim for r in made),
            "lap": sweep[2] + sum(r.t_lap for r in made),
        },
    }
    return run.perms, info


def match_weights(
    structure: Structure,
    model_a: nn.Module,
    model_b: nn.Module,
    *,
    max_iter: int = 100,
    seed: int = 0,
    coefficients: Sequence[float] | None = None,
    init: Mapping[str, Tensor] | None = None,
    tol: float = DEFAULT_TOL,
    lap: LapMethod = "auto",
    start: StartKind = "best",
) -> Alignment:
    """Git Re-Basin weight matching: permute ``model_b``'s units to maximise ``Σ ⟨W_a, π(W_b)⟩``.

    Coordinate descent: each iteration visits the ties in a random order (``seed``) and solves one LAP per tie
    with every other permutation held fixed (exactly, see :func:`solve_lap_warm`); it stops after an iteration
    that changes nothing or gains at most ``tol`` relative (``obj_t − obj_{t−1} ≤ tol·|obj_{t−1}|``).

    Args:
        structure: the models' groups.
        model_a: the reference (its basis is the merged basis; its permutation is the identity).
        model_b: the model to align.
        max_iter: at most this many passes over the groups.
        seed: seed of the visiting order.
        coefficients: averaging weights of (a, b) stored in the alignment (default 0.5/0.5).
        init: starting permutations of ``model_b`` (overrides ``start``).
        tol: relative-gain stopping tolerance; ``0`` runs until an iteration changes nothing (Git Re-Basin).
        lap: LAP solver, ``"auto"`` (sparse + certificate from 768 units), ``"dense"`` or ``"sparse"``.
        start: where descent starts without ``init``. ``"identity"``: Git Re-Basin's start. ``"propagate"``: one
            forward sweep that solves each tie only from the terms whose other axes are fixed or already solved
            (never against a neighbour still in its arbitrary order). ``"best"`` (default): the propagated
            start if it reaches the bound ``Σ ‖W_a‖·‖W_b‖`` (a permuted copy: optimal, nothing else runs); else
            descent from the identity, replaced by descent from the propagated start when the pair is related
            (that start's objective ≥ 0.5 × the bound) and that start already scores higher than where the
            identity run ended. From the identity, the first LAPs fit the noise of neighbours in an
            arbitrary order and can lock descent far below the optimum (depthwise + squeeze-excite nets: a
            permuted copy of a model is not recovered); from the propagated start, trained pairs of MLPs end with
            higher barriers (``docs/alignment.md`` §5).

    Returns:
        A permutation :class:`Alignment` of the two models. ``info`` holds ``objective`` (after each
        iteration of the kept run), ``iterations``, ``stopped`` (``"unchanged"``, ``"tol"``, ``"max_iter"``, or
        ``"optimal"`` when the propagated start reaches the bound ``Σ ‖W_a‖·‖W_b‖``: no descent needed),
        ``converged``, ``start`` (the start kept), ``starts`` (the objective each start reached), ``solves`` (LAPs
        solved, every start included) and ``seconds`` (time in similarities and in LAPs).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mergelab.structure.types import Axis, Group, Structure
        >>> a = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> s = Structure((Group("0", 3, (Axis("0.weight", 0, "out"), Axis("0.bias", 0, "out"),
        ...                                Axis("2.weight", 1, "in"))),))
        >>> match_weights(s, a, a).perms[1]["0"]
        tensor([0, 1, 2])
    """
    check_same_architecture([model_a, model_b], "match_weights")
    perms, info = _weight_matching(
        structure,
        float_parameters(model_a),
        float_parameters(model_b),
        max_iter=max_iter,
        seed=seed,
        init=init,
        tol=tol,
        lap=lap,
        start=start,
    )
    info = {"method": "weight_matching", **info}
    return Alignment.from_permutations(structure, [{}, perms], coefficients, info)


def _permuted_params(structure: Structure, params: Mapping[str, Tensor], perms: Mapping[str, Tensor]) -> dict:
    axes = structure.param_axes
    return {
        k: permute_tensor(v, [(a, perms[g.name]) for g, a in axes[k]]) if k in axes else v
        for k, v in params.items()
    }


def merge_many_rounds(
    n: int, max_iter: int, seed: int, rematch: Callable[[int, int], bool], what: str
) -> dict:
    """Re-Basin's MergeMany schedule: rounds that visit the ``n`` models in a random order (``seed``), where
    ``rematch(i, round)`` re-aligns model ``i`` to the others and says whether it changed; stops after a round
    that changes nothing (or ``max_iter`` rounds). Returns the ``info`` entries ``merge_many``, ``rounds``,
    ``converged``."""
    gen = torch.Generator().manual_seed(seed)
    rounds, converged = 0, False
    for r in range(max_iter):
        rounds = r + 1
        changed = False
        for i in torch.randperm(n, generator=gen).tolist():
            changed = rematch(i, r) or changed
        logger.info("%s, merge many: round %d, changed=%s", what, rounds, changed)
        if not changed:
            converged = True
            break
    return {"merge_many": True, "rounds": rounds, "converged": converged}


def match_weights_many(
    structure: Structure,
    models: Sequence[nn.Module],
    *,
    reference: int = 0,
    merge_many: bool = False,
    coefficients: Sequence[float] | None = None,
    max_iter: int = 100,
    seed: int = 0,
    tol: float = DEFAULT_TOL,
    lap: LapMethod = "auto",
    start: StartKind = "best",
) -> Alignment:
    """Weight matching for N ≥ 2 models: each to a reference, or Re-Basin's MergeMany.

    Args:
        structure: the models' groups.
        models: the models.
        reference: with ``merge_many=False``, every model is matched to this one (whose basis is kept).
        merge_many: repeatedly match each model (random order) to the weighted mean of the others, already in
            the shared basis, until a full round changes no permutation (or ``max_iter`` rounds).
        coefficients: averaging weights (uniform by default).
        max_iter: passes of each inner weight matching, and rounds of MergeMany.
        seed: seed of all visiting orders.
        tol, lap, start: stopping tolerance, LAP solver and starting point of each inner weight matching (see
            :func:`match_weights`; MergeMany's rounds start from the current permutations).

    Returns:
        A permutation :class:`Alignment` of all models.
    """
    models, coefs = check_models(models, reference, coefficients, "match_weights_many")
    n = len(models)
    params = [float_parameters(m) for m in models]
    perms: list[Perms] = [identity_perms(structure) for _ in models]
    infos: list[dict] = [{} for _ in models]
    for i in range(n):
        if i != reference:
            perms[i], infos[i] = _weight_matching(
                structure,
                params[reference],
                params[i],
                max_iter=max_iter,
                seed=seed,
                tol=tol,
                lap=lap,
                start=start,
            )
    info: dict = {"method": "weight_matching", "reference": reference, "per_model": infos}
    if merge_many:

        def rematch(i: int, r: int) -> bool:
            others = [j for j in range(n) if j != i]
            total = sum(coefs[j] for j in others)
            target = {k: torch.zeros_like(v) for k, v in params[i].items()}
            for j in others:
                pj = _permuted_params(structure, params[j], perms[j])
                for k in target:
                    target[k] += (coefs[j] / total) * pj[k]
            new, _ = _weight_matching(
                structure,
                target,
                params[i],
                max_iter=max_iter,
                seed=seed + r,
                init=perms[i],
                tol=tol,
                lap=lap,
            )
            changed = any(not torch.equal(new[g], perms[i][g]) for g in new)
            perms[i] = new
            return changed

        info.update(merge_many_rounds(n, max_iter, seed, rematch, "weight matching"))
    return Alignment.from_permutations(structure, perms, coefs, info)


@register_solver("weight")
def weight_solver(
    ctx: MatchContext,
    *,
    coefficients: Sequence[float] | None = None,
    reference: int = 0,
    merge_many: bool = False,
    max_iter: int = 100,
    seed: int = 0,
    tol: float = DEFAULT_TOL,
    lap: LapMethod = "auto",
    start: StartKind = "best",
) -> Alignment:
    """Git Re-Basin weight matching: permute every model's units onto the reference's (needs no data).

    Args:
        coefficients: averaging weights (uniform by default).
        reference: the model whose basis is kept.
        merge_many: Re-Basin's MergeMany (align each model to the mean of the others, repeatedly).
        max_iter: iterations of coordinate descent (and MergeMany rounds).
        seed: seed of the visiting order.
        tol: relative-gain stopping tolerance (0: stop only when an iteration changes nothing).
        lap: LAP solver: ``"auto"``, ``"dense"`` or ``"sparse"``.
        start: ``"best"``, ``"identity"`` or ``"propagate"`` (see :func:`match_weights`).
    """
    return match_weights_many(
        ctx.structure,
        ctx.models,
        reference=reference,
        merge_many=merge_many,
        coefficients=coefficients,
        max_iter=max_iter,
        seed=seed,
        tol=tol,
        lap=lap,
        start=start,
    )
