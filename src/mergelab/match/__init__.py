"""Matching: activation statistics, unit similarity, and the solvers that turn them into an Alignment."""

from mergelab.match.features import FeatureStats, collect_features, trace_model
from mergelab.match.similarity import activation_similarity, weight_objective, weight_similarity
from mergelab.match.solvers import (
    match_activations,
    match_weights,
    match_weights_many,
    solve_block_lap,
    solve_lap,
)

__all__ = [
    "FeatureStats",
    "activation_similarity",
    "collect_features",
    "match_activations",
    "match_weights",
    "match_weights_many",
    "solve_block_lap",
    "solve_lap",
    "trace_model",
    "weight_objective",
    "weight_similarity",
]
