"""Run folders: where every command and study writes its results."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def prepare_run_dir(path: str | Path, *, force: bool = False) -> Path:
    """Create ``path`` as an empty folder; an existing non-empty one is only replaced with ``force=True``."""
    path = Path(path)
    if path.exists() and (path.is_file() or any(path.iterdir())):
        if not force:
            raise FileExistsError(
                f"{path} already exists and is not empty; pass --force (force=True) to overwrite it"
            )
        log.warning("overwriting %s", path)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path
