"""Run folders written atomically: a command's output appears complete or not at all.

Every command writes into a temporary sibling of its ``--out`` folder and renames it into place only when it
has finished, so an error, Ctrl-C or a kill never leaves a half-written folder under the real name, and
``--force`` replaces the old folder only at that last moment (a failed run keeps it). A lock file beside the
folder makes a second concurrent writer fail at once. Studies use a *resumable* temporary folder,
``OUT.partial``, which survives interruption so a re-run can reuse its finished jobs.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> out = Path(tempfile.mkdtemp()) / "run"
    >>> with RunDir(out) as tmp:
    ...     _ = (tmp / "result.txt").write_text("done")
    ...     out.exists()
    False
    >>> (out / "result.txt").read_text()
    'done'
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
# Files whose presence says "a mergelab command wrote this folder": only such folders may be replaced.
_OUTPUT_MARKERS = ("config.json", "report.md", "curve.json", "metrics.json", "model.safetensors")
_OPEN: set[Path] = set()  # temporary folders being written by this process (nested writes go straight in)
_ACTIVE: list[RunDir] = []  # opened and neither committed nor aborted yet (see abort_unfinished)


class RunDirBusyError(RuntimeError):
    """Another process is writing the same output folder."""


def check_out_path(path: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """Refuse an output folder whose replacement could destroy something that is not a mergelab result.

    Refused: the current folder, the home folder, or any folder containing them; an input, a folder containing an
    input, or a folder inside an input. Returns the resolved path.
    """
    out = Path(path).expanduser().resolve()
    guarded = [(Path.cwd().resolve(), "the current folder"), (Path.home().resolve(), "the home folder")]
    for place, what in guarded:
        if out == place or out in place.parents:
            raise ValueError(f"refusing --out {path}: it is or contains {what} ({place})")
    for item in inputs:
        src = Path(item).expanduser().resolve()
        if out == src:
            raise ValueError(f"refusing --out {path}: it is the input {item}")
        if out in src.parents:
            raise ValueError(f"refusing --out {path}: it contains the input {item}")
        if src in out.parents:
            raise ValueError(f"refusing --out {path}: it lies inside the input {item}")
    return out


class RunDir:
    """Context manager: yields a temporary folder; on success renames it to ``path``.

    Args:
        path: the final folder.
        force: replace an existing ``path`` (at the final rename, never earlier).
        inputs: paths the command reads; ``path`` may not be, contain or lie inside any of them.
        resumable: write into ``path.partial`` and keep it on failure, so a re-run can resume from it.

    Raises:
        FileExistsError: ``path`` exists (and is not empty) without ``force``, or is not a mergelab folder.
        ValueError: ``path`` is the current or home folder, or overlaps an input.
        RunDirBusyError: another process is writing ``path``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        force: bool = False,
        inputs: Iterable[str | Path] = (),
        resumable: bool = False,
    ) -> None:
        self.path = Path(os.path.abspath(os.path.expanduser(path)))  # "." and "x/.." get a real name
        self.force = force
        self.inputs = list(inputs)
        self.resumable = resumable
        self.tmp = self.path.with_name(self.path.name + PARTIAL_SUFFIX) if resumable else self._tmp_name()
        self._lock_fd: int | None = None
        self._nested = False

    # ---------------------------------------------------------------------------------------------- protocol
    def __enter__(self) -> Path:
        return self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def open(self) -> Path:
        """Check the target, take the lock and create the temporary folder; returns it."""
        here = self.path.resolve()
        if here in _OPEN or any(p in here.parents for p in _OPEN):
            # Inside a folder this process is already writing atomically: write in place (a subfolder left by an
            # interrupted attempt of a resumed study is replaced; the open folder itself is kept as it is).
            self._nested = True
            if here not in _OPEN and self.path.exists():
                _remove(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
            return self.path
        check_out_path(self.path, self.inputs)
        self._check_replaceable()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self._recover_and_clean()
            if not self.resumable:
                self.tmp.mkdir()
            else:
                self.tmp.mkdir(exist_ok=True)
        except BaseException:
            self._unlock()
            raise
        _OPEN.add(self.tmp.resolve())
        _ACTIVE.append(self)
        return self.tmp

    def commit(self) -> Path:
        """Rename the temporary folder to ``path`` (replacing the old one only now, if ``force``)."""
        if self._nested:
            return self.path
        try:
            target = self.path
            if target.exists() and _has_content(target):
                if not self.force:
                    raise FileExistsError(
                        f"{target} appeared while this run was writing; the result is kept in {self.tmp}"
                    )
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.rename(target, old)
                os.rename(self.tmp, target)
                _remove(old)
            else:
                if target.is_dir():
                    target.rmdir()  # an empty folder (e.g. made by the user beforehand)
                os.rename(self.tmp, target)
        finally:
            self._close()
        return self.path

    def abort(self) -> None:
        """Drop the temporary folder (a resumable one is kept for the next run); the target is untouched."""
        if self._nested:
            return
        try:
            if self.resumable:
                if self.tmp.exists():
                    log.warning("partial results kept in %s; run the same command again to resume", self.tmp)
            else:
                _remove(self.tmp)
        finally:
            self._close()

    def _close(self) -> None:
        _OPEN.discard(self.tmp.resolve())
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        self._unlock()

    # ---------------------------------------------------------------------------------------------- helpers
    def _tmp_name(self) -> Path:
        return self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}-{id(self):x}")

    def _check_replaceable(self) -> None:
        p = self.path
        if p.is_symlink() or (p.exists() and not p.is_dir()):
            raise FileExistsError(f"{p} exists and is not a folder; choose another --out")
        if not p.exists() or not _has_content(p):
            return
        if not self.force:
            raise FileExistsError(f"{p} already exists and is not empty; pass --force to replace it")
        if not any((p / m).exists() for m in _OUTPUT_MARKERS):
            raise FileExistsError(
                f"refusing to replace {p}: it does not look like a mergelab output "
                f"(none of {', '.join(_OUTPUT_MARKERS)}); remove it yourself or choose another --out"
            )

    def _recover_and_clean(self) -> None:
        """With the lock held, leftovers of killed writers are ours to tidy (an orphaned old folder is restored)."""
        prefix = f".{self.path.name}."
        for sib in self.path.parent.iterdir():
            if not sib.name.startswith(prefix):
                continue
            rest = sib.name[len(prefix) :]
            if rest.startswith("old-"):
                if not self.path.exists():
                    log.warning("restoring %s from %s (left by an interrupted replace)", self.path, sib)
                    os.rename(sib, self.path)
                else:
                    _remove(sib)
            elif rest.startswith("tmp-"):
                _remove(sib)

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process lock
            return
        lock_path = self.path.with_name(f".{self.path.name}.lock")
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunDirBusyError(
                    f"another mergelab process is writing {self.path} (lock {lock_path} is held); "
                    "wait for it or choose another --out"
                ) from None
            try:  # the holder we waited on may have unlinked the file: lock the current one
                same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._lock_fd = fd
                return
            os.close(fd)

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path.with_name(f".{self.path.name}.lock"))
        os.close(self._lock_fd)
        self._lock_fd = None


@contextlib.contextmanager
def abort_unfinished() -> Iterator[None]:
    """Abort every :class:`RunDir` opened (without ``with``) inside this block and not committed when it ends.

    Lets a command open its output early and commit at the end without nesting its whole body in ``with``.
    """
    before = list(_ACTIVE)
    try:
        yield
    finally:
        for rd in reversed([rd for rd in _ACTIVE if rd not in before]):
            rd.abort()


def prepare_run_dir(path: str | Path, *, force: bool = False) -> Path:
    """Create ``path`` as an empty folder, non-atomically (prefer :class:`RunDir`).

    An existing non-empty folder is refused unless ``force``, and even then only a mergelab output is replaced;
    the current and home folders are always refused.
    """
    rd = RunDir(path, force=force)
    check_out_path(rd.path)
    rd._check_replaceable()
    if rd.path.exists():
        log.warning("overwriting %s", rd.path)
        _remove(rd.path)
    rd.path.mkdir(parents=True, exist_ok=True)
    return rd.path


def _has_content(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
