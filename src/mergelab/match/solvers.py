"""Permutation solvers: linear assignment (plain and block-aware), Git Re-Basin weight and activation matching.

Conventions: a solved permutation ``perm`` of model ``b`` says merged unit ``j`` (= the reference's unit ``j``)
is model ``b``'s unit ``perm[j]``; :class:`~mergelab.structure.alignment.Alignment` stores it as ``M = λ P`` with
``P[j, perm[j]] = 1``.

The *units of coordinate descent* are ties (``Structure.ties``): tied groups must move their blocks identically,
so they are solved together — their block-level scores are summed before the block assignment.

Weight matching is Git Re-Basin's coordinate descent with three changes (see ``docs/alignment.md`` for the
measurements):

* each LAP is solved exactly by :func:`solve_lap_warm`: from 768 units on, on a sparse candidate set with an LP
  dual certificate, warm-started from the dual prices of the group's previous solve;
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
    https://arxiv.org/abs/2209.04836 (weight matching, activation matching, MergeMany).
    Jonker, Volgenant. A shortest augmenting path algorithm for dense and sparse linear assignment problems.
    Computing 38, 1987 (LAPJV / LAPJVsp: scipy's dense and sparse solvers).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from torch import Tensor, nn

from mergelab.match.features import FeatureStats, collect_features
from mergelab.match.similarity import (
    SimilarityKind,
    WeightSimilarity,
    activation_similarity,
    float_parameters,
    weight_objective,
)
from mergelab.structure.alignment import Alignment
from mergelab.structure.checks import check_same_architecture, normalize_coefficients
from mergelab.structure.transform import permute_tensor
from mergelab.structure.types import Structure

__all__ = [
    "DEFAULT_TOL",
    "LapState",
    "StartKind",
    "match_activations",
    "match_weights",
    "match_weights_many",
    "solve_block_lap",
    "solve_lap",
    "solve_lap_warm",
    "solve_tie",
]

logger = logging.getLogger(__name__)

Perms = dict[str, Tensor]

# A new assignment replaces the current one only if it is better by more than this (relative) margin: float32
# similarity sums carry round-off of about this size, and accepting round-off "improvements" could cycle.
_REL_TOL = 1e-7

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


LapMethod = Literal["auto", "dense", "sparse"]
StartKind = Literal["best", "identity", "propagate"]

# Below this size scipy's dense solver is faster than the candidate-set path (measured: benchmarks/matching.py).
_SPARSE_MIN_SIZE = 768
# Candidate edges per row in the sparse path (on average; the dual certificate adds any edge that is missing).
_CANDIDATES_PER_ROW = 16
# Reduced costs down to -_CERT_TOL·max|similarity| count as zero: float64 round-off of the dual sums.
_CERT_TOL = 1e-11
# Column generation: edges added per row with a negative reduced cost, and rounds before falling back to scipy.
_EDGES_PER_VIOLATION = 16
_MAX_ROUNDS = 30
# Bellman-Ford passes allowed when checking that added edges leave the assignment optimal (else: re-solve).
_QUICK_PASSES = 64
# Warm prices under which more than this fraction of rows left their cheapest column are dropped (cold start).
_STALE_FRACTION = 0.9


@dataclass(frozen=True)
class LapState:
    """A solved assignment and its dual column prices: the warm start of the next, similar LAP.

    ``prices`` are the column potentials ``v`` of the minimisation form (cost ``-similarity``): with
    ``u_i = cost[i, perm[i]] - v[perm[i]]`` every reduced cost ``cost[i, j] - u_i - v_j`` is ≥ 0, which is the
    LP certificate that ``perm`` is optimal.
    """

    perm: np.ndarray  # (n,) int64, row -> column
    prices: np.ndarray  # (n,) float64


def _dense_lap(cost: np.ndarray) -> np.ndarray:
    """scipy's Jonker-Volgenant solver on a cost matrix (rows -> columns)."""
    # Subtracting row and column minima changes every assignment's cost by the same constant, so the optimum
    # is unchanged; scipy's solver needs noticeably fewer augmentation steps on the reduced matrix (~25%).
    cost = cost - cost.min(1, keepdims=True)
    cost -= cost.min(0, keepdims=True)
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return perm


def _potentials(
    perm: np.ndarray,
    ii: np.ndarray,
    jj: np.ndarray,
    ce: np.ndarray,
    start: np.ndarray,
    tol: float,
    max_passes: int | None = None,
) -> np.ndarray | None:
    """Column potentials ``d`` with ``d_j ≤ d_k + (c_ij − c_ik)`` on every candidate edge ``(i, j)``, ``k = perm[i]``.

    Bellman-Ford on the column graph (vectorised passes, warm-started at ``start``): such ``d`` exists exactly
    when ``perm`` is optimal on the candidate edges. Returns ``None`` if the passes do not settle (within
    ``max_passes``, default ``2n + 2``: then there is a negative cycle, i.e. ``perm`` is not optimal).
    """
    n = len(perm)
    k = perm[ii]
    cx = np.empty(n)
    on = jj == k  # the assigned edges are candidates (exactly one per row)
    cx[ii[on]] = ce[on]
    keep = ~on
    src, dst = k[keep], jj[keep]
    w = ce[keep] - cx[ii[keep]]  # cost of moving row i from its column k to j
    order = np.argsort(dst, kind="stable")
    src, dst, w = src[order], dst[order], w[order]
    if dst.size == 0:
        return start.copy()
    heads = np.flatnonzero(np.r_[True, dst[1:] != dst[:-1]])
    tgt = dst[heads]
    d = start.copy()
    for _ in range(max_passes or 2 * n + 2):
        cand = np.minimum.reduceat(d[src] + w, heads)
        better = cand < d[tgt] - tol
        if not better.any():
            return d
        d[tgt[better]] = cand[better]
    return None


def _row_blocks(n: int, width: int) -> Iterator[slice]:
    """Row slices whose (rows × width) float64 temporaries stay in cache (about 2 MB)."""
    step = max(1, (1 << 18) // max(1, width))
    for lo in range(0, n, step):
        yield slice(lo, min(n, lo + step))


def _candidates(red: np.ndarray, tau: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Edges of a row block with reduced cost ≤ ``tau``, at most ``4k`` per row (the smallest ones).

    The cap matters for rows of (near-)equal costs, e.g. a dead unit's all-zero correlations: every entry would
    pass the threshold, and any few of them serve as well (the certificate adds what is missing).
    """
    mask = red <= tau  # (rows, n)
    cap = min(red.shape[1], 4 * k)
    over = np.flatnonzero(np.count_nonzero(mask, axis=1) > cap)
    if over.size:
        keep = np.argpartition(red[over], cap - 1, axis=1)[:, :cap]
        mask[over] = False
        mask[over[:, None], keep] = True
    return np.nonzero(mask)


def _sparse_lap(sim: np.ndarray, state: LapState | None, k: int = _CANDIDATES_PER_ROW) -> LapState | None:
    """Exact LAP on a dense similarity via a sparse candidate set and an LP dual certificate.

    Works on the minimisation form ``cost = −sim`` (float64, formed block by block, never as a whole matrix):

    1. Reduced costs ``R = cost − u − v`` from the warm prices ``v`` (or row/column minima); if the previous
       assignment is still row-minimal under ``v``, it is optimal as it stands (certified, nothing to solve).
    2. Candidates: the ``≈k`` smallest reduced costs per row, plus the previous assignment (or the identity),
       so a perfect matching exists; scipy's sparse Jonker-Volgenant (LAPJVsp) solves the LAP on them.
    3. Potentials for that solution (:func:`_potentials`) are dual prices for the *dense* problem if no
       reduced cost is negative; otherwise each violating row's most negative edges join the candidates and
       step 2 repeats (column generation). If the potentials still settle with the new edges, the assignment is
       unchanged and only the check repeats; otherwise LAPJVsp re-solves.

    Dense passes run over row blocks that fit in cache. Returns ``None`` when the certificate is not reached
    within ``_MAX_ROUNDS`` rounds (the caller then solves densely).
    """
    n = sim.shape[0]
    lo, hi = float(sim.min()), float(sim.max())
    tol = _CERT_TOL * (max(abs(lo), abs(hi)) or 1.0)
    ar = np.arange(n)
    blocks = list(_row_blocks(n, n))

    def cost(b: slice | np.ndarray) -> np.ndarray:
        return np.negative(sim[b], dtype=np.float64)  # (rows, n)

    def cost_at(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return np.negative(sim[i, j], dtype=np.float64)

    # A threshold giving about k candidates per row, estimated on a few rows (the certificate fixes the rest).
    sample_rows = np.linspace(0, n - 1, min(n, 64)).astype(np.int64)
    kth = max(0, min(sample_rows.size * n - 1, k * sample_rows.size - 1))
    warm = state is not None
    if state is not None:
        v = state.prices
        prev = state.perm
        red = cost(sample_rows) - v
        tau = np.partition((red - red.min(1, keepdims=True)).ravel(), kth)[kth]
        u = np.empty(n)
        parts_i, parts_j = [], []
        for b in blocks:
            red = cost(b) - v  # (rows, n)
            u[b] = red.min(1)
            bi, bj = _candidates(red - u[b, None], tau, k)
            parts_i.append(bi + b.start)
            parts_j.append(bj)
        unhappy = int(np.count_nonzero(cost_at(ar, prev) - v[prev] > u + tol))
        if unhappy == 0:
            return state  # every row still sits at its cheapest column: the old assignment is optimal
        # Stale prices (most rows moved, early in coordinate descent) pick worse candidates than a cold start.
        warm = unhappy <= _STALE_FRACTION * n
        logger.debug(
            "sparse LAP: %d of %d rows left their cheapest column (warm start: %s)", unhappy, n, warm
        )
    else:
        prev = ar
    if not warm:
        u = -sim.max(1).astype(np.float64)
        v = np.full(n, np.inf)
        for b in blocks:
            np.minimum(v, (cost(b) - u[b, None]).min(0), out=v)
        red = cost(sample_rows) - v - u[sample_rows, None]
        tau = np.partition(red.ravel(), kth)[kth]
        parts_i, parts_j = [], []
        for b in blocks:
            bi, bj = _candidates(cost(b) - v - u[b, None], tau, k)
            parts_i.append(bi + b.start)
            parts_j.append(bj)
    # The previous assignment (or the identity) joins the candidates, so a perfect matching exists among them.
    key = np.concatenate([*(i * n + j for i, j in zip(parts_i, parts_j, strict=True)), ar * n + prev])
    key = np.unique(key)
    ii, jj = key // n, key % n  # distinct edges, sorted by row
    d = v - float(v.max())
    offset = 1.0 + hi  # LAPJVsp needs non-zero weights: cost + offset ≥ 1 everywhere (same optimum)
    m = min(n, _EDGES_PER_VIOLATION)
    resolve = True
    perm = prev
    ce = cost_at(ii, jj)
    for _ in range(_MAX_ROUNDS):
        if resolve:
            graph = csr_matrix((ce + offset, (ii, jj)), shape=(n, n))
            try:
                _, perm = min_weight_full_bipartite_matching(graph)
            except ValueError:  # no perfect matching: impossible, the previous assignment is a candidate
                return None
            perm = perm.astype(np.int64)
        pot = _potentials(perm, ii, jj, ce, d, tol * 1e-3, None if resolve else _QUICK_PASSES)
        if pot is None:
            if resolve:
                return None
            resolve = True  # the new edges open a better assignment
            continue
        d = pot
        u = cost_at(ar, perm) - d[perm]
        slack = np.empty(n)  # the most negative reduced cost of each row
        for b in blocks:
            slack[b] = (cost(b) - d).min(1) - u[b]
        bad = np.flatnonzero(slack < -tol)
        logger.debug("sparse LAP: %d candidate edges, %d rows with negative reduced costs", ii.size, bad.size)
        if bad.size == 0:
            return LapState(perm, d)
        red = cost(bad) - d - u[bad, None]  # (b, n)
        cols = np.argpartition(red, m - 1, axis=1)[:, :m] if m < n else np.tile(ar, (bad.size, 1))
        vals = np.take_along_axis(red, cols, 1)
        r, c = np.nonzero(vals < -tol)
        # New edges: every candidate has a reduced cost ≥ -tol·1e-3 under these potentials, so none repeats.
        ii = np.concatenate([ii, bad[r]])
        jj = np.concatenate([jj, cols[r, c]])
        ce = np.concatenate([ce, cost_at(bad[r], cols[r, c])])
        resolve = False
    return None


def _has_constant_lines(sim: np.ndarray) -> bool:
    """Whether some row or column is constant (a dead unit's correlations): every column ties there, which
    makes the LP dual degenerate and column generation slow, so such matrices are solved densely."""
    return bool(np.any(sim.max(1) == sim.min(1)) or np.any(sim.max(0) == sim.min(0)))


def solve_lap_warm(
    similarity: Tensor, state: LapState | None = None, *, method: LapMethod = "auto"
) -> tuple[Tensor, LapState | None]:
    """Maximum-similarity assignment that can start from the dual prices of a previous, similar problem.

    Exact either way: ``"dense"`` is scipy's Jonker-Volgenant solver on the full matrix; ``"sparse"`` solves
    on a candidate set and certifies optimality for the full matrix with LP duals (reduced costs ≥
    ``-1e-11·max|similarity|``, i.e. float64 round-off), adding edges until the certificate holds. Warm starts
    (``state`` from the previous solve of this group) make step 1 of the sparse path find the old assignment
    still optimal, or pick candidates that already contain the new one. ``"auto"`` uses the sparse path from
    768 units on (below, scipy's dense solver is faster), except for a cold start on a matrix with a constant
    row or column (dead units), where the dual is degenerate.

    Args:
        similarity: (n × n) scores.
        state: the :class:`LapState` returned by the previous solve of a matrix of the same size.
        method: ``"auto"``, ``"dense"`` or ``"sparse"``.

    Returns:
        ``(perm, state)``: ``perm[i]`` is the column matched to row ``i``; ``state`` warm-starts the next solve
        (``None`` from the dense path, which has no dual prices).
    """
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"solve_lap: need a square matrix, got {tuple(similarity.shape)}")
    if method not in ("auto", "dense", "sparse"):
        raise ValueError(f"solve_lap: method={method!r}; choose 'auto', 'dense' or 'sparse'")
    n = similarity.shape[0]
    sim_t = similarity.detach().cpu()
    sim = (sim_t if sim_t.dtype in (torch.float32, torch.float64) else sim_t.double()).numpy()
    if not (np.isfinite(sim.max()) and np.isfinite(sim.min())):  # max/min propagate NaN
        raise ValueError("solve_lap: similarity contains NaN or inf")
    if state is not None and state.perm.shape != (n,):
        state = None
    if state is None:
        best = sim.argmax(1)
        if np.unique(best).size == n:
            return torch.from_numpy(best.astype(np.int64)), None  # every row gets its best column: optimal
    sparse = method == "sparse" or (
        method == "auto" and n >= _SPARSE_MIN_SIZE and (state is not None or not _has_constant_lines(sim))
    )
    if sparse:
        solved = _sparse_lap(sim, state)
        if solved is not None:
            return torch.from_numpy(solved.perm.copy()), solved
        logger.debug("solve_lap: no dual certificate for n=%d; solving densely", n)
    return torch.from_numpy(_dense_lap(np.negative(sim, dtype=np.float64))), None


def solve_lap(similarity: Tensor, *, method: LapMethod = "auto") -> Tensor:
    """Maximum-similarity assignment of rows to columns (exact; see :func:`solve_lap_warm` for the methods).

    A single solve has no prices to start from, so ``"auto"`` means scipy's dense solver here; repeated solves
    of a changing matrix (weight matching) gain from :func:`solve_lap_warm`.

    Args:
        similarity: (n × n) scores; ``similarity[i, j]`` = how well row unit ``i`` matches column unit ``j``.
        method: ``"auto"`` (default: dense), ``"dense"`` (scipy) or ``"sparse"`` (candidates + dual certificate).

    Returns:
        int64 ``perm`` with ``perm[i]`` = the column matched to row ``i``.

    Example:
        >>> import torch
        >>> solve_lap(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        tensor([1, 0])
    """
    return solve_lap_warm(similarity, method="dense" if method == "auto" else method)[0]


def solve_block_lap(similarities: Sequence[Tensor], blocks: int) -> list[Tensor]:
    """Block-aware assignment: blocks go to blocks as wholes, then units inside each matched block pair.

    The score of pairing row block ``a`` with column block ``b`` is the value of the best unit assignment
    inside that pair; with several (tied) groups the scores are summed, so all of them get the same block
    assignment, while each keeps its own within-block assignment.

    Args:
        similarities: one (n_t × n_t) matrix per tied group; every ``n_t`` divisible by ``blocks``.
        blocks: number of blocks.

    Returns:
        One int64 permutation per input matrix (rows → columns), each mapping block ``a`` onto one block.
    """
    if not similarities:
        raise ValueError("solve_block_lap: no similarity matrices")
    if blocks == 1:
        return [solve_lap(s) for s in similarities]
    score = np.zeros((blocks, blocks))
    inner: list[dict[tuple[int, int], np.ndarray]] = []
    for s_t in similarities:
        n = s_t.shape[0]
        if s_t.shape != (n, n) or n % blocks:
            raise ValueError(f"solve_block_lap: {tuple(s_t.shape)} is not square with {blocks} equal blocks")
        bs = n // blocks
        sb = s_t.detach().cpu().double().numpy().reshape(blocks, bs, blocks, bs).transpose(0, 2, 1, 3)
        cols_t: dict[tuple[int, int], np.ndarray] = {}
        if bs == 1:
            score += sb[:, :, 0, 0]
            cols_t = {(a, b): np.zeros(1, dtype=np.int64) for a in range(blocks) for b in range(blocks)}
        else:
            for a in range(blocks):
                for b in range(blocks):
                    r, c = linear_sum_assignment(sb[a, b], maximize=True)
                    score[a, b] += sb[a, b][r, c].sum()
                    cols_t[(a, b)] = c
        inner.append(cols_t)
    _, block_perm = linear_sum_assignment(score, maximize=True)
    out = []
    for s_t, cols_t in zip(similarities, inner, strict=True):
        bs = s_t.shape[0] // blocks
        perm = np.concatenate([block_perm[a] * bs + cols_t[(a, int(block_perm[a]))] for a in range(blocks)])
        out.append(torch.from_numpy(perm.astype(np.int64)))
    return out


def solve_tie(
    structure: Structure, tie: Sequence[str], similarities: Sequence[Tensor], *, method: LapMethod = "auto"
) -> list[Tensor]:
    """Solve the groups of one tie jointly (plain LAP for a lone free group, block-aware otherwise).

    ``method`` is that of :func:`solve_lap` (``"auto"``: dense for a single solve).
    """
    return _solve_tie_warm(structure, tie, similarities, None, "dense" if method == "auto" else method)[0]


def _solve_tie_warm(
    structure: Structure,
    tie: Sequence[str],
    similarities: Sequence[Tensor],
    state: LapState | None,
    method: LapMethod,
) -> tuple[list[Tensor], LapState | None]:
    """:func:`solve_tie` that also takes and returns the warm-start state of a lone free group."""
    groups = [structure[n] for n in tie]
    if len(groups) == 1 and groups[0].blocks == 1:
        perm, new_state = solve_lap_warm(similarities[0], state, method=method)
        return [perm], new_state
    return solve_block_lap(similarities, groups[0].blocks), None


def _value(sims: Sequence[Tensor], perms: Sequence[Tensor]) -> float:
    return float(sum(s[torch.arange(s.shape[0]), p].double().sum() for s, p in zip(sims, perms, strict=True)))


def _relative_gain(before: float, after: float) -> float:
    """``(after − before) / |before|`` (infinite for a gain from zero)."""
    if before == 0.0:
        return math.inf if after > 0.0 else 0.0
    return (after - before) / abs(before)


def _identity(structure: Structure) -> Perms:
    return {g.name: torch.arange(g.size) for g in structure}


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
        new, lap_states[tie] = _solve_tie_warm(structure, tie, sims, None, lap)
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
            new, lap_states[tie] = _solve_tie_warm(structure, tie, sims, lap_states.get(tie), lap)
            run.t_lap += time.perf_counter() - t1
            run.t_sim += t1 - t0
            run.solves += 1
            old_v, new_v = _value(sims, [perms[g] for g in tie]), _value(sims, new)
            if new_v > old_v + _REL_TOL * max(1.0, abs(old_v)):
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
        perms = _identity(structure)
        perms.update({k: torch.as_tensor(v, dtype=torch.long).clone() for k, v in init.items()})
        run, used = _descend(structure, sim, perms, **kw), "init"
        made.append(run)
    elif start == "identity":
        run, used = _descend(structure, sim, _identity(structure), **kw), "identity"
        made.append(run)
    else:
        prop, states = _identity(structure), {}
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
            run, used = _descend(structure, sim, _identity(structure), **kw), "identity"
            made.append(run)
            starts["identity"] = run.history[-1]
            margin = _REL_TOL * max(1.0, abs(run.history[-1]))
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


def _check_models(
    models: Sequence[nn.Module], reference: int, coefficients: Sequence[float] | None, op: str
) -> tuple[list[nn.Module], list[float]]:
    """The checks every N-model matcher makes first: ≥ 2 models of one architecture, a valid reference."""
    models = list(models)
    n = len(models)
    if n < 2:
        raise ValueError(f"{op}: need at least 2 models, got {n}")
    if not 0 <= reference < n:
        raise ValueError(f"{op}: reference={reference} out of range for {n} models")
    check_same_architecture(models, op)
    return models, normalize_coefficients(coefficients, n, op)


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
    models, coefs = _check_models(models, reference, coefficients, "match_weights_many")
    n = len(models)
    params = [float_parameters(m) for m in models]
    perms: list[Perms] = [_identity(structure) for _ in models]
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
        gen = torch.Generator().manual_seed(seed)
        rounds, converged = 0, False
        for r in range(max_iter):
            rounds = r + 1
            changed = False
            for i in torch.randperm(n, generator=gen).tolist():
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
                if any(not torch.equal(new[g], perms[i][g]) for g in new):
                    changed = True
                perms[i] = new
            logger.info("merge many: round %d, changed=%s", rounds, changed)
            if not changed:
                converged = True
                break
        info.update({"merge_many": True, "rounds": rounds, "converged": converged})
    return Alignment.from_permutations(structure, perms, coefs, info)


def _mean_similarity(
    stats: FeatureStats,
    group: str,
    i: int,
    perms: Sequence[Tensor],
    weights: Mapping[int, float],
    kind: SimilarityKind,
) -> Tensor:
    """Similarity of the weighted mean of the other models' aligned units (rows) to model ``i``'s (columns).

    Exact from the joint moments: ``cov(Σ_j w_j x_j[p_j], x_i) = Σ_j w_j C_ji[p_j]`` and
    ``var(Σ_j w_j x_j[p_j]) = Σ_jk w_j w_k C_jk[p_j, p_k]`` on the diagonal.
    """
    cov = sum(w * stats.cov(group, j, i)[perms[j]] for j, w in weights.items())
    if kind == "covariance":
        return cov
    var = sum(
        wj * wk * stats.cov(group, j, k)[perms[j], perms[k]]
        for j, wj in weights.items()
        for k, wk in weights.items()
    )
    std_y = var.clamp_min(0).sqrt()
    std_i = stats.std(group, i)
    denom = torch.outer(std_y, std_i)
    safe = denom > 1e-12 * (denom.max() if denom.numel() else 1)
    return torch.where(safe, cov / torch.where(safe, denom, torch.ones_like(denom)), torch.zeros_like(cov))


def match_activations(
    structure: Structure,
    models: Sequence[nn.Module],
    data: Iterable | None = None,
    *,
    coefficients: Sequence[float] | None = None,
    reference: int = 0,
    merge_many: bool = False,
    similarity: SimilarityKind = "correlation",
    max_batches: int | None = None,
    max_iter: int = 100,
    seed: int = 0,
    stats: FeatureStats | None = None,
) -> Alignment:
    """Activation matching: one LAP per group (tie) on the correlation of each model's units to the reference's.

    Args:
        structure: the models' groups (probes say where units are observed).
        models: two or more models of one architecture.
        data: batches ``x`` or ``(x, y)``; not needed when ``stats`` is given.
        coefficients: averaging weights (uniform by default).
        reference: whose basis is the merged basis.
        merge_many: after aligning to the reference, repeatedly re-align each model (random order) to the
            weighted mean of the others' aligned activations, until a round changes nothing — MergeMany on
            activations, computed exactly from the joint moments.
        similarity: ``"correlation"`` or ``"covariance"``.
        max_batches: limit on batches streamed.
        max_iter: rounds of ``merge_many``.
        seed: seed of the ``merge_many`` order.
        stats: precomputed :func:`~mergelab.match.features.collect_features` of ``models`` (same order).

    Returns:
        A permutation :class:`Alignment`; ``info["matched_similarity"]`` holds, per group, the mean similarity of
        matched units to the reference.
    """
    models, coefs = _check_models(models, reference, coefficients, "match_activations")
    n = len(models)
    if stats is None:
        if data is None:
            raise ValueError("match_activations: needs data= (a loader yielding x or (x, y)) or stats=")
        stats = collect_features(models, structure, data, max_batches=max_batches)
    elif stats.num_models != n:
        raise ValueError(f"match_activations: stats were collected for {stats.num_models} models, got {n}")

    perms: list[Perms] = [_identity(structure) for _ in models]
    ties = structure.tie_sets()
    for tie in ties:
        for i in range(n):
            if i == reference:
                continue
            sims = [activation_similarity(stats, g, reference, i, similarity) for g in tie]
            for g, p in zip(tie, solve_tie(structure, tie, sims), strict=True):
                perms[i][g] = p
    info: dict = {"method": "activation_matching", "similarity": similarity, "reference": reference}
    if merge_many:
        gen = torch.Generator().manual_seed(seed)
        rounds, converged = 0, False
        for r in range(max_iter):
            rounds = r + 1
            changed = False
            for i in torch.randperm(n, generator=gen).tolist():
                weights = {
                    j: coefs[j] / sum(coefs[k] for k in range(n) if k != i) for j in range(n) if j != i
                }
                for tie in ties:
                    sims = [
                        _mean_similarity(stats, g, i, [perms[j][g] for j in range(n)], weights, similarity)
                        for g in tie
                    ]
                    new = solve_tie(structure, tie, sims)
                    old_v, new_v = _value(sims, [perms[i][g] for g in tie]), _value(sims, new)
                    if new_v > old_v + _REL_TOL * max(1.0, abs(old_v)):
                        for g, p in zip(tie, new, strict=True):
                            perms[i][g] = p
                        changed = True
            logger.info("activation merge many: round %d, changed=%s", rounds, changed)
            if not changed:
                converged = True
                break
        info.update({"merge_many": True, "rounds": rounds, "converged": converged})
    matched = {}
    for g in structure:
        vals = [
            float(
                activation_similarity(stats, g.name, reference, i, similarity)[
                    torch.arange(g.size), perms[i][g.name]
                ].mean()
            )
            for i in range(n)
            if i != reference
        ]
        matched[g.name] = sum(vals) / len(vals)
    info["matched_similarity"] = matched
    logger.info("activation matching: mean matched %s per group %s", similarity, matched)
    return Alignment.from_permutations(structure, perms, coefs, info)
