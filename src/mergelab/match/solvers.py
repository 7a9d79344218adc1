"""The permutation solvers, one import away: LAPs (:mod:`mergelab.match.lap`), weight matching
(:mod:`mergelab.match.weight_matching`) and activation matching (:mod:`mergelab.match.activation_matching`)."""

from mergelab.match.activation_matching import match_activations
from mergelab.match.lap import LapState, solve_block_lap, solve_lap, solve_lap_warm, solve_tie
from mergelab.match.weight_matching import DEFAULT_TOL, StartKind, match_weights, match_weights_many

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
