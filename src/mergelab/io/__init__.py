"""Checkpoints in and out, and the run folders results are written to."""

from __future__ import annotations

from mergelab.io.checkpoint import CONFIG, WEIGHTS, CheckpointError, load, read_config, save
from mergelab.io.run_dir import RunDir, RunDirBusyError, check_out_path, prepare_run_dir
from mergelab.io.sources import CheckpointSource, open_checkpoint
from mergelab.io.writer import ShardedWriter

__all__ = [
    "CONFIG",
    "WEIGHTS",
    "CheckpointError",
    "CheckpointSource",
    "RunDir",
    "RunDirBusyError",
    "ShardedWriter",
    "check_out_path",
    "load",
    "open_checkpoint",
    "prepare_run_dir",
    "read_config",
    "save",
]
