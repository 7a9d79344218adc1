"""Checkpoints in and out, and the run folders results are written to."""

from __future__ import annotations

from mergelab.io.checkpoint import CONFIG, WEIGHTS, CheckpointError, load, read_config, save
from mergelab.io.run_dir import RunDir, RunDirBusyError, check_out_path, prepare_run_dir

__all__ = [
    "CONFIG",
    "WEIGHTS",
    "CheckpointError",
    "RunDir",
    "RunDirBusyError",
    "check_out_path",
    "load",
    "prepare_run_dir",
    "read_config",
    "save",
]
