"""Reproducible studies: one module + one config dataclass each, run locally or on a local Ray cluster."""

from mergelab.experiments.runner import (
    STUDIES,
    Executor,
    get_study,
    list_studies,
    make_executor,
    register_study,
    run_study,
)

__all__ = ["STUDIES", "Executor", "get_study", "list_studies", "make_executor", "register_study", "run_study"]
