"""Checkpoints in and out, and the run folders results are written to."""

from __future__ import annotations

from mergelab.io.checkpoint import CONFIG, WEIGHTS, CheckpointError, load, read_config, save
from mergelab.io.run_dir import prepare_run_dir

__all__ = ["CONFIG", "WEIGHTS", "CheckpointError", "load", "prepare_run_dir", "read_config", "save"]
