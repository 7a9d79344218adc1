"""Linear assignment: the one exact LAP solver (dense, or sparse with an LP dual certificate), block-aware
assignment for attention heads, and the one tie solver every permutation matcher uses.

A solved permutation ``perm`` says row unit ``j`` (the reference's unit ``j``) is matched to column unit
``perm[j]``. The *units of coordinate descent* are ties (``Structure.ties``): tied groups must move their blocks
identically, so they are solved together — their block-level scores are summed before the block assignment.

References:
    Jonker, Volgenant. A shortest augmenting path algorithm for dense and sparse linear assignment problems.
    Computing 38, 1987 (LAPJV / LAPJVsp: scipy's dense and sparse solvers).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from torch import Tensor

from mergelab.structure.types import Structure

__all__ = [
    "IMPROVEMENT_RTOL",
    "LapMethod",
    "LapState",
    "Perms",
    "assignment_value",
    "identity_perms",
    "solve_block_lap",
    "solve_lap",
    "solve_lap_warm",
    "solve_tie",
    "solve_tie_warm",
]

logger = logging.getLogger(__name__)

Perms = dict[str, Tensor]

# A new assignment replaces the current one only if it is better by more than this (relative) margin: float32
# similarity sums carry round-off of about this size, and accepting round-off "improvements" could cycle.
IMPROVEMENT_RTOL = 1e-7

LapMethod = Literal["auto", "dense", "sparse"]


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
    return solve_tie_warm(structure, tie, similarities, None, "dense" if method == "auto" else method)[0]


def solve_tie_warm(
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


def assignment_value(sims: Sequence[Tensor], perms: Sequence[Tensor]) -> float:
    """Total similarity of the matched pairs of a tie (one similarity and one permutation per group)."""
    return float(sum(s[torch.arange(s.shape[0]), p].double().sum() for s, p in zip(sims, perms, strict=True)))


def identity_perms(structure: Structure) -> Perms:
    """Every group in its own order (the reference's permutation)."""
    return {g.name: torch.arange(g.size) for g in structure}
