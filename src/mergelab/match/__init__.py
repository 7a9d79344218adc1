"""Matching: a context (models, structure, statistics), a registry of solvers, and the solvers themselves.

Importing this package registers the built-in solvers (``identity``, ``weight``, ``activation``, ``zip``,
``dual``) in :data:`~mergelab.match.registry.SOLVERS`.
"""

from mergelab.match import dual as _dual  # noqa: F401  (registers the ``dual`` solver)
from mergelab.match import zip as _zip  # noqa: F401  (registers the ``zip`` solver)
from mergelab.match.activation_matching import match_activations
from mergelab.match.context import MatchContext, match_context
from mergelab.match.features import FeatureStats, collect_features, trace_model
from mergelab.match.lap import solve_block_lap, solve_lap
from mergelab.match.registry import SOLVERS, get_solver, list_solvers, register_solver
from mergelab.match.similarity import activation_similarity, weight_objective, weight_similarity
from mergelab.match.weight_matching import match_weights, match_weights_many

__all__ = [
    "SOLVERS",
    "FeatureStats",
    "MatchContext",
    "activation_similarity",
    "collect_features",
    "get_solver",
    "list_solvers",
    "match_activations",
    "match_context",
    "match_weights",
    "match_weights_many",
    "register_solver",
    "solve_block_lap",
    "solve_lap",
    "trace_model",
    "weight_objective",
    "weight_similarity",
]
