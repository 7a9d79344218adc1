"""Studies: one registry, one runner, and executors that run independent jobs in parallel, locally or on Ray.

A study is a function ``study(config, out, executor) -> Report`` plus a frozen config dataclass. The runner
applies overrides from a JSON file or ``key=value`` pairs (typed, range-checked), writes into ``OUT.partial``
(renamed to ``OUT`` when the report is written), records the config, and hands the study an executor whose
``map`` stores each job's result in ``jobs/`` as it finishes, so an interrupted study resumes where it stopped.
Jobs given to ``executor.map`` must be picklable top-level functions (they run in worker processes or on Ray).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from tqdm.auto import tqdm

from mergelab.experiments._jobcache import JobCache
from mergelab.io import RunDir
from mergelab.options import OptionError, parse_value, split_kv
from mergelab.report import Report

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
Backend = Literal["local", "ray"]


class Executor:
    """Runs independent jobs in parallel worker processes (standard library), caching each result as it finishes.

    Args:
        progress: show a progress bar.
        workers: processes to use (default: ``$MERGELAB_WORKERS``, else one per CPU core); 1 runs the jobs here,
            in turn (so does a single job).
        cache: where finished jobs are stored and found again (a run folder's ``jobs/``); ``None``: no cache.

    ``map`` returns the results in the order of ``items``. A job whose result is in the cache is not run again;
    ``reused`` and ``computed`` count them.
    """

    backend: str = "local"

    def __init__(
        self, progress: bool = True, workers: int | None = None, cache: JobCache | str | Path | None = None
    ) -> None:
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.progress = progress
        self.workers = workers
        self.cache = JobCache(cache) if isinstance(cache, (str, Path)) else cache
        self.reused = 0
        self.computed = 0
        self._pool: ProcessPoolExecutor | None = None

    def map(self, fn: Callable[[T], R], items: Sequence[T], desc: str = "jobs") -> list[R]:
        items = list(items)
        results: list[Any] = [None] * len(items)
        keys: list[str | None] = [self.cache.key(fn, it) if self.cache is not None else None for it in items]
        todo: list[int] = []
        for i, key in enumerate(keys):
            hit = self.cache.get(key) if self.cache is not None and key else None
            if hit is not None:
                results[i] = hit[0]
                self.reused += 1
            else:
                todo.append(i)
        with tqdm(
            total=len(items), initial=len(items) - len(todo), desc=desc, disable=not self.progress
        ) as bar:

            def done(j: int, result: Any) -> None:
                i = todo[j]
                results[i] = result
                if self.cache is not None and keys[i]:
                    self.cache.put(keys[i], result)
                self.computed += 1
                bar.update(1)

            if todo:
                self._run(fn, [items[i] for i in todo], done)
        return results

    def _run(self, fn: Callable[[T], Any], items: list[T], done: Callable[[int, Any], None]) -> None:
        workers = self.workers or int(os.environ.get("MERGELAB_WORKERS", 0)) or os.cpu_count() or 1
        if min(workers, len(items)) <= 1:
            for j, item in enumerate(items):
                done(j, fn(item))
            return
        if self._pool is None:  # kept for the executor's life: workers import a study's modules once
            threads = max(1, (os.cpu_count() or 1) // workers)
            self._pool = ProcessPoolExecutor(
                workers, mp_context=_mp_context(), initializer=_worker_init, initargs=(os.getpid(), threads)
            )
        pool = self._pool
        futures = {pool.submit(fn, item): j for j, item in enumerate(items)}
        finished: set[Future] = set()
        try:
            for fut in as_completed(futures):
                done(futures[fut], fut.result())
                finished.add(fut)
        except BaseException:
            # Keep what finishes anyway: jobs already running are waited for (and cached), queued ones dropped.
            for fut in futures:
                fut.cancel()
            for fut in futures:
                if fut in finished or fut.cancelled():
                    continue
                try:
                    res = fut.result()
                except BaseException:
                    continue
                done(futures[fut], res)
            self.close()
            raise

    def close(self) -> None:
        """Stop the worker processes (the executor can still be used: a new pool starts when needed)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _mp_context() -> Any:
    """Fresh worker processes, not forks of a driver whose thread pools may be mid-use.

    On Linux a fork server that has imported torch once forks each worker cheaply; elsewhere workers spawn.
    """
    import multiprocessing as mp

    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "mergelab"])
        return ctx
    return mp.get_context("spawn")


def _worker_init(driver_pid: int, threads: int) -> None:
    """In each worker: share the cores, and exit if the driver dies (even by SIGKILL) instead of lingering."""
    import threading

    import torch

    torch.set_num_threads(threads)

    first_parent = os.getppid()  # the driver, or the fork server (which exits with the driver)

    def watch() -> None:
        while os.getppid() == first_parent:
            try:
                os.kill(driver_pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:
                pass
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


class RayExecutor(Executor):
    """Runs jobs as Ray tasks on a local cluster (started here if none is running; needs ``mergelab[ray]``).

    A cluster started here is shut down on ``close`` and, through a watchdog process, also when the driver dies.
    """

    backend = "ray"

    def __init__(
        self, progress: bool = True, num_cpus: int | None = None, cache: JobCache | str | Path | None = None
    ) -> None:
        super().__init__(progress, cache=cache)
        try:
            import ray
        except ImportError:
            raise RuntimeError(
                "--backend ray needs Ray: pip install 'mergelab[ray]' (the default local backend needs nothing)"
            ) from None
        self._ray = ray
        self._started = False
        self._watchdog: Any = None
        if not ray.is_initialized():
            ray.init(
                num_cpus=num_cpus or os.cpu_count() or 1,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                # Keep workers on this machine's loopback only.
                _node_ip_address="127.0.0.1",
            )
            self._started = True
            self._watchdog = _start_watchdog()

    def _run(self, fn: Callable[[T], Any], items: list[T], done: Callable[[int, Any], None]) -> None:
        ray = self._ray
        remote = ray.remote(num_cpus=1)(fn)
        refs = {remote.remote(item): j for j, item in enumerate(items)}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                done(refs[ref], ray.get(ref))

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False
        if self._watchdog is not None:
            self._watchdog.stdin.close()  # the watchdog sees EOF, finds nothing left to kill, and exits
            self._watchdog.wait(timeout=30)
            self._watchdog = None


def _start_watchdog() -> Any:
    """A process that kills this driver's Ray processes once the driver is gone (its stdin pipe closes)."""
    import subprocess
    import sys

    from mergelab.experiments import _watchdog

    known = [f"{pid}:{start}" for pid, start in _watchdog.ray_descendants(os.getpid()).items()]
    return subprocess.Popen(
        [sys.executable, _watchdog.__file__, str(os.getpid()), *known],
        stdin=subprocess.PIPE,
        start_new_session=True,  # a Ctrl-C to the driver's group must not kill the watchdog first
    )


def make_executor(
    backend: Backend = "local",
    progress: bool = True,
    num_cpus: int | None = None,
    *,
    workers: int | None = None,
    cache: JobCache | str | Path | None = None,
) -> Executor:
    if backend == "local":
        return Executor(progress, workers=workers or num_cpus, cache=cache)
    if backend == "ray":
        return RayExecutor(progress, num_cpus or workers, cache=cache)
    raise ValueError(f"unknown backend {backend!r}; use 'local' or 'ray'")


StudyFn = Callable[[Any, Path, Executor], Report]


@dataclass(frozen=True)
class StudyInfo:
    name: str
    fn: StudyFn
    config_cls: type
    summary: str


STUDIES: dict[str, StudyInfo] = {}


def register_study(name: str, config_cls: type) -> Callable[[StudyFn], StudyFn]:
    """Register ``fn(config, out, executor) -> Report`` as study ``name`` with its config dataclass."""

    def deco(fn: StudyFn) -> StudyFn:
        if name in STUDIES:
            raise ValueError(f"study {name!r} is registered twice")
        summary = (fn.__doc__ or "").strip().split("\n", 1)[0]
        STUDIES[name] = StudyInfo(name, fn, config_cls, summary)
        return fn

    return deco


def list_studies() -> list[str]:
    _load_builtin_studies()
    return sorted(STUDIES)


def get_study(name: str) -> StudyInfo:
    _load_builtin_studies()
    try:
        return STUDIES[name]
    except KeyError:
        raise ValueError(f"unknown study {name!r}; choose one of {sorted(STUDIES)}") from None


def build_config(config_cls: type[T], file: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """A config from defaults, then a JSON file, then ``key=value`` overrides, each parsed against its field type.

    Raises ``ValueError`` (an :class:`~mergelab.options.OptionError`) naming the key, the value and the expected
    type, for a bad value, an unknown key or a value out of range (e.g. ``seed_pairs=0``).
    """
    values: dict[str, Any] = {}
    if file is not None:
        try:
            loaded = json.loads(Path(file).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read study config {file}: {e}") from e
        if not isinstance(loaded, dict):
            raise ValueError(f"study config {file} must be a JSON object")
        values.update(loaded)
    values.update(split_kv(list(overrides), "override"))
    return config_from_dict(config_cls, values)


# Option names that count something, so must be at least 1 (0 would silently produce an empty study).
_AT_LEAST_ONE = {
    "epochs", "seed_pairs", "batch_size", "width", "depth", "steps", "interpolation_steps", "k", "max_iter",
    "torch_threads", "mnist1d_samples", "n_bootstrap", "scored_units", "drawn_units", "top_k", "pattern_models",
}  # fmt: skip
_NON_EMPTY = {"seeds", "datasets", "archs", "widths", "variants", "methods", "heads", "pools", "n_members"}


def config_from_dict(config_cls: type[T], values: Mapping[str, Any]) -> T:
    """``config_cls(**values)`` with every value parsed against its field type and range-checked."""
    name = config_cls.__name__
    fields = {f.name: f for f in dataclasses.fields(config_cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise OptionError(f"{name}: unknown option(s) {unknown}; valid: {sorted(fields)}")
    hints = typing.get_type_hints(config_cls)
    typed: dict[str, Any] = {}
    for k, v in values.items():
        try:
            typed[k] = parse_value(k, v, hints.get(k))
        except OptionError as e:
            raise OptionError(f"{name}: {e}") from None
        x = typed[k]
        if k in _AT_LEAST_ONE and isinstance(x, (int, float)) and not isinstance(x, bool) and x < 1:
            raise OptionError(f"{name}: {k}={v!r}: expected at least 1")
        if (k == "lr" or k.endswith("_lr")) and isinstance(x, float) and x <= 0:
            raise OptionError(f"{name}: {k}={v!r}: expected a positive number")
        if k in _NON_EMPTY and isinstance(x, (tuple, list)) and not x:
            raise OptionError(f"{name}: {k}={v!r}: expected at least one value")
    try:
        return config_cls(**typed)
    except (TypeError, ValueError) as e:
        raise OptionError(f"{name}: {e}") from None


def run_study(
    name: str,
    out: str | Path,
    *,
    config: Any = None,
    config_file: str | Path | None = None,
    overrides: Iterable[str] = (),
    backend: Backend = "local",
    force: bool = False,
    resume: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Run study ``name`` into the folder ``out`` and return the path of its report.md.

    The study writes into ``OUT.partial``, which becomes ``OUT`` only once the report is written. Each job's
    result is stored in ``jobs/`` as it finishes, so running the same command again after an interruption reuses
    every finished job (a different config is refused, naming the keys that differ). ``resume=True`` also reuses
    the jobs of a completed ``OUT`` (and replaces it); ``force=True`` replaces ``OUT`` and discards an
    interrupted run of a different config.
    """
    info = get_study(name)
    cfg = config if config is not None else build_config(info.config_cls, config_file, overrides)
    record = {"study": name, "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str))}
    final = Path(out)
    if final.is_dir() and any(final.iterdir()) and not (force or resume):
        raise FileExistsError(
            f"{final} already exists; pass --resume to reuse its finished jobs or --force to replace it"
        )
    run_dir = RunDir(final, force=force or resume, resumable=True)
    folder = run_dir.open()
    try:
        _adopt_previous(folder, final, record, force=force, resume=resume)
        (folder / "config.json").write_text(json.dumps({**record, "backend": backend}, indent=2) + "\n")
        executor = make_executor(backend, progress, workers=workers, cache=JobCache(folder / "jobs"))
        try:
            report = info.fn(cfg, folder, executor)
        finally:
            executor.close()
        report.save()
        total = executor.reused + executor.computed
        if executor.reused:
            log.info(
                "reused %d of %d jobs from an earlier run; computed %d",
                executor.reused,
                total,
                executor.computed,
            )
    except BaseException:
        run_dir.abort()
        raise
    run_dir.commit()
    return final / "report.md"


def _adopt_previous(folder: Path, final: Path, record: dict[str, Any], *, force: bool, resume: bool) -> None:
    """Decide what an earlier run left: an interrupted ``folder`` (resumed) or, with ``resume``, ``final``."""
    prev = _read_record(folder)
    source = folder
    if prev is None and any(folder.iterdir()):
        shutil.rmtree(folder)  # a partial folder without config.json holds no finished job
        folder.mkdir()
    if prev is None and resume and final.is_dir():
        prev, source = _read_record(final), final
        if prev is None:
            raise ValueError(f"cannot resume {final}: it has no readable config.json")
    if prev is None:
        return
    diff = _differing_keys(prev, record)
    if diff and not force:
        what = "an interrupted run" if source == folder else "the run"
        raise ValueError(
            f"{source} holds {what} with a different config (differs in {', '.join(diff)}); "
            "use the same options, another --out, or --force to start anew"
        )
    if diff:
        if not resume:  # --force alone: start anew
            if source == folder:
                shutil.rmtree(folder)
                folder.mkdir()
            return
        log.info("config differs in %s; reusing only the jobs whose options match", ", ".join(diff))
    if source == final:
        shutil.copytree(final, folder, dirs_exist_ok=True)
    n = JobCache(folder / "jobs").count()
    log.info("resuming %s: %d finished job result(s) on disk", final, n)


def _read_record(folder: Path) -> dict[str, Any] | None:
    try:
        rec = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) and "config" in rec else None


def _differing_keys(prev: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    if prev.get("study") != new.get("study"):
        return ["study"]
    a, b = prev.get("config") or {}, new.get("config") or {}
    return sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))


def _load_builtin_studies() -> None:
    import importlib
    import pkgutil

    import mergelab.experiments as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_") and mod.name != "runner":
            importlib.import_module(f"mergelab.experiments.{mod.name}")
