"""Studies: one registry, one runner, and executors that run independent jobs locally or on a Ray cluster.

A study is a function ``study(config, out, executor) -> Report`` plus a frozen config dataclass. The runner
creates the run folder (refusing to overwrite without ``force``), applies overrides from a JSON file or
``key=value`` pairs, records the config, and hands the study an executor. Jobs given to ``executor.map`` must be
picklable top-level functions so the same study runs sequentially or on Ray unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from tqdm.auto import tqdm

from mergelab.io import prepare_run_dir
from mergelab.report import Report

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
Backend = Literal["local", "ray"]


class Executor:
    """Runs independent jobs sequentially with a progress bar."""

    backend: str = "local"

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress

    def map(self, fn: Callable[[T], R], items: Sequence[T], desc: str = "jobs") -> list[R]:
        return [fn(item) for item in tqdm(items, desc=desc, disable=not self.progress)]

    def close(self) -> None:
        pass


class RayExecutor(Executor):
    """Runs jobs as Ray tasks on a local cluster (started here if none is running)."""

    backend = "ray"

    def __init__(self, progress: bool = True, num_cpus: int | None = None) -> None:
        super().__init__(progress)
        import ray

        self._ray = ray
        self._started = False
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

    def map(self, fn: Callable[[T], R], items: Sequence[T], desc: str = "jobs") -> list[R]:
        ray = self._ray
        remote = ray.remote(num_cpus=1)(fn)
        refs = [remote.remote(item) for item in items]
        results: dict[Any, R] = {}
        pending = list(refs)
        with tqdm(total=len(refs), desc=f"{desc} (ray)", disable=not self.progress) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    results[ref] = ray.get(ref)
                    bar.update(1)
        return [results[r] for r in refs]

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()


def make_executor(backend: Backend = "local", progress: bool = True, num_cpus: int | None = None) -> Executor:
    if backend == "local":
        return Executor(progress)
    if backend == "ray":
        return RayExecutor(progress, num_cpus)
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
    """A config from defaults, then a JSON file, then ``key=value`` overrides (values parsed as JSON if they can)."""
    values: dict[str, Any] = {}
    if file is not None:
        try:
            loaded = json.loads(Path(file).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read study config {file}: {e}") from e
        if not isinstance(loaded, dict):
            raise ValueError(f"study config {file} must be a JSON object")
        values.update(loaded)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            values[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            values[key.strip()] = raw
    return config_from_dict(config_cls, values)


def config_from_dict(config_cls: type[T], values: Mapping[str, Any]) -> T:
    fields = {f.name: f for f in dataclasses.fields(config_cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{config_cls.__name__}: unknown option(s) {unknown}; valid: {sorted(fields)}")
    hints = typing.get_type_hints(config_cls)
    coerced = {k: _coerce(v, hints.get(k)) for k, v in values.items()}
    return config_cls(**coerced)


def _coerce(value: Any, hint: Any) -> Any:
    # JSON gives lists where configs hold tuples (frozen dataclasses keep tuples so they stay hashable).
    origin = typing.get_origin(hint)
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(hint)
        inner = args[0] if args else None
        return tuple(_coerce(v, inner) for v in value)
    if isinstance(value, list):
        return tuple(value)
    return value


def run_study(
    name: str,
    out: str | Path,
    *,
    config: Any = None,
    config_file: str | Path | None = None,
    overrides: Iterable[str] = (),
    backend: Backend = "local",
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Run study ``name`` into the folder ``out`` and return the path of its report.md."""
    info = get_study(name)
    cfg = config if config is not None else build_config(info.config_cls, config_file, overrides)
    folder = prepare_run_dir(out, force=force)
    (folder / "config.json").write_text(
        json.dumps({"study": name, "backend": backend, "config": dataclasses.asdict(cfg)}, indent=2) + "\n"
    )
    executor = make_executor(backend, progress)
    try:
        report = info.fn(cfg, folder, executor)
    finally:
        executor.close()
    return report.save()


def _load_builtin_studies() -> None:
    import importlib
    import pkgutil

    import mergelab.experiments as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_") and mod.name != "runner":
            importlib.import_module(f"mergelab.experiments.{mod.name}")
