"""Merging checkpoints on disk, tensor by tensor: as big as the disk, not as big as the RAM.

:func:`merge_checkpoints` reads any checkpoint form (:mod:`mergelab.io.sources`: run folders, ``.safetensors``
files, Hugging Face folders, sharded or not), checks names, shapes and dtypes across all inputs before writing
anything, then reads one tensor from every input, merges it and appends it to a sharded writer
(:mod:`mergelab.io.writer`). Memory is the inputs' copies of the largest tensor plus the method's working space.

Each method runs the same per-tensor kernel as its in-memory version, so the result is bit-identical to
``mergelab.merge(...)`` on the loaded models:

* ``average`` (with ``coefficients``): :func:`~mergelab.merge.average.average_tensors`;
* ``task_arithmetic``, ``ties``, ``dare``: :func:`~mergelab.merge.task_vectors.merge_task_vector_tensor` (TIES
  with ``trim="global"`` first finds each model's threshold over its whole task vector in two extra streaming
  passes: a histogram of the magnitudes' top 16 bits, then an exact selection inside one bin);
* ``weight_matching`` / ``activation_matching``: the models are rebuilt (zoo spec or Hugging Face config, on the
  meta device, then given the read tensors) and aligned in memory — what the solver needs — then released, and the permuted average is streamed with
  :func:`~mergelab.structure.alignment.merge_tensor`.

Which floating tensors are statistics (BatchNorm running mean/var: averaged, not task vectors) comes from the
model spec of a mergelab checkpoint, otherwise from their names (``running_mean``, ``running_var``).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mergelab.io.checkpoint import CONFIG
from mergelab.io.sources import INDEX, PROVENANCE, CheckpointSource, open_checkpoint
from mergelab.io.writer import ShardedWriter, TensorPlan

__all__ = ["PROVENANCE", "STREAMED_METHODS", "check_inputs", "merge_checkpoints"]

log = logging.getLogger(__name__)

STREAMED_METHODS = ("average", "task_arithmetic", "ties", "dare", "weight_matching", "activation_matching")
TASK_VECTOR_METHODS = ("task_arithmetic", "ties", "dare")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_STAT_SUFFIXES = (".running_mean", ".running_var")

Kernel = Callable[[str, "Tensor | None", list[Tensor]], Tensor]


def merge_checkpoints(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    method: str = "average",
    base: str | Path | None = None,
    max_shard_size: int | str | None = None,
    progress: bool = False,
    force: bool = False,
    verify: bool = True,
    data: Iterable | None = None,
    example_input: Any = None,
    metadata: Mapping[str, Any] | None = None,
    **options: Any,
) -> Path:
    """Merge checkpoints on disk into a new checkpoint folder, streaming one tensor at a time.

    Args:
        inputs: checkpoints (run folders, ``.safetensors`` files, Hugging Face folders), at least one.
        out: the folder to write (refused if it exists and is not empty, unless ``force``).
        method: one of :data:`STREAMED_METHODS`.
        base: the pre-trained checkpoint (``task_arithmetic``, ``ties``, ``dare``).
        max_shard_size: bytes or ``"5GB"``-like size per output shard; ``None``: one ``model.safetensors``.
        progress: show a progress bar over bytes read.
        force: replace an existing ``out``.
        verify: compare each input's files with the checksums recorded at save time, where there are any.
        data, example_input: for the aligned methods (activation statistics; tracing input).
        metadata: extra provenance stored with the result.
        **options: the method's options, as in :func:`mergelab.merge` (``coefficients``, ``scaling``,
            ``density``, ``trim``, ``drop_rate``, ``seed`` …); an unknown one raises ``TypeError``.

    Returns:
        The output folder: weights (sharded with an index when over ``max_shard_size``) plus either a mergelab
        ``config.json`` (zoo inputs) or the first input's ``config.json`` and other non-weight files with a
        ``mergelab.json`` provenance file (Hugging Face inputs), so ``from_pretrained`` loads it.

    Raises:
        ValueError: inputs whose tensor names, shapes or dtypes differ (naming the first such tensor), non-finite
            weights (naming the input and tensor), bad options.

    Example:
        >>> import tempfile, torch, mergelab
        >>> d = tempfile.mkdtemp()
        >>> a, b = (mergelab.build_model("mlp", (1, 8, 8), 10, width=16, depth=1) for _ in range(2))
        >>> pa, pb = mergelab.save(a, d + "/a"), mergelab.save(b, d + "/b")
        >>> m = mergelab.load(merge_checkpoints([pa, pb], d + "/avg"))
        >>> torch.equal(m.head.weight, (0.5 * a.head.weight + 0.5 * b.head.weight).detach())
        True
    """
    from mergelab.io.run_dir import RunDir

    op = f"merge {method}"
    if method not in STREAMED_METHODS:
        raise ValueError(f"{op}: not a streamed method; choose one of {list(STREAMED_METHODS)}")
    if not inputs:
        raise ValueError(f"{op}: got no checkpoints")
    if method in TASK_VECTOR_METHODS and base is None:
        raise ValueError(f"{op}: needs a base checkpoint (--base), the model every input was fine-tuned from")
    if method not in TASK_VECTOR_METHODS and base is not None:
        raise ValueError(f"{op}: takes no base checkpoint")
    _return_freed_memory()
    sources = [open_checkpoint(p) for p in inputs]
    base_src = open_checkpoint(base) if base is not None else None
    try:
        everyone = ([base_src] if base_src is not None else []) + sources
        names = (["base " + str(base)] if base is not None else []) + [str(p) for p in inputs]
        keys = check_inputs(everyone, names, op)
        if verify:
            for s in everyone:
                s.verify_checksums()
        _check_out(Path(out), [*inputs, *([base] if base is not None else [])], op)
        kernel, passes = _kernel(method, sources, base_src, keys, options, data, example_input, op)
        plan = [TensorPlan(k, sources[0].info(k).dtype, sources[0].info(k).shape) for k in keys]
        inputs_ = [*inputs, *([base] if base is not None else [])]
        with RunDir(out, force=force, inputs=inputs_) as folder:  # renamed into place only when complete
            writer = ShardedWriter(folder, plan, max_shard_size=max_shard_size, metadata={"merge": method})
            try:
                read_bytes = sum(s.nbytes for s in everyone)
                with _progress(read_bytes * passes, op, progress) as bar:
                    bar.update(read_bytes * (passes - 1))  # the threshold passes already ran
                    for k, read in zip(keys, _prefetch(everyone, keys), strict=True):
                        b, tensors = (read[0], read[1:]) if base_src is not None else (None, read)
                        merged = kernel(k, b, tensors)
                        _check_finite(merged, read, names, k, op)
                        writer.write(k, merged)
                        bar.update(sum(s.info(k).nbytes for s in everyone))
                sha = writer.close()
            except BaseException:
                writer.abort()
                raise
            _write_config(folder, sources[0], sha, method, inputs, base, options, metadata)
    finally:
        for s in sources + ([base_src] if base_src is not None else []):
            s.close()
    return Path(out)


def check_inputs(sources: Sequence[CheckpointSource], names: Sequence[str], op: str = "merge") -> list[str]:
    """Check that every source holds the first one's tensor names with the same shapes and dtypes.

    Returns:
        The tensor names, in the first source's storage order.

    Raises:
        ValueError: naming the first tensor (in that order) that is missing, extra, or differs.
    """
    ref = sources[0]
    keys = ref.keys()
    for k in keys:
        r = ref.info(k)
        for s, who in zip(sources[1:], names[1:], strict=True):
            if k not in s:
                raise ValueError(f"{op}: tensor {k!r} of {names[0]} is missing from {who}")
            t = s.info(k)
            if t.shape != r.shape or t.dtype != r.dtype:
                raise ValueError(
                    f"{op}: tensor {k!r} is {_fmt(t.dtype, t.shape)} in {who} but {_fmt(r.dtype, r.shape)} "
                    f"in {names[0]}"
                )
    for s, who in zip(sources[1:], names[1:], strict=True):
        extra = [k for k in s if k not in ref]
        if extra:
            raise ValueError(f"{op}: {who} has tensor {extra[0]!r}, which {names[0]} does not have")
    return keys


# --------------------------------------------------------------------------------------------------- kernels
def _kernel(
    method: str,
    sources: list[CheckpointSource],
    base: CheckpointSource | None,
    keys: list[str],
    options: dict[str, Any],
    data: Iterable | None,
    example_input: Any,
    op: str,
) -> tuple[Kernel, int]:
    """The per-tensor function of ``method`` and the number of passes over the inputs it needs."""
    if method == "average":
        from mergelab.merge.average import average_tensors
        from mergelab.structure.checks import normalize_coefficients

        unknown = sorted(set(options) - {"coefficients"})
        if unknown:
            raise TypeError(f"{op}: unknown option(s) {unknown}; valid options: ['coefficients']")
        coefs = normalize_coefficients(options.get("coefficients"), len(sources), "average")
        return (lambda k, b, ts: average_tensors(ts, coefs)), 1
    if method in TASK_VECTOR_METHODS:
        from mergelab.merge.task_vectors import merge_task_vector_tensor, task_vector_recipe

        assert base is not None
        config, seed = task_vector_recipe(method, len(sources), **options)
        stats = _statistic_names(base, keys)
        thresholds = None
        passes = 1
        if config.global_trim:
            params = [k for k in keys if k not in stats and base.info(k).dtype.is_floating_point]
            thresholds = _global_thresholds(base, sources, params, config.density)
            passes = 3

        def kernel(k: str, b: Tensor | None, ts: list[Tensor]) -> Tensor:
            assert b is not None
            return merge_task_vector_tensor(
                k, b, ts, config, statistic=k in stats, seed=seed, thresholds=thresholds
            )

        return kernel, passes
    return _aligned_kernel(method, sources, options, data, example_input, op), 1


def _aligned_kernel(
    method: str,
    sources: list[CheckpointSource],
    options: dict[str, Any],
    data: Iterable | None,
    example_input: Any,
    op: str,
) -> Kernel:
    from mergelab.merge.aligned import align
    from mergelab.structure.alignment import merge_tensor

    allowed = {"coefficients", "reference", "merge_many", "max_iter", "seed", "structure", "max_batches"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"{op}: unknown option(s) {unknown}; valid options: {sorted(allowed)}")
    if method == "weight_matching":
        options = {k: v for k, v in options.items() if k != "max_batches"}
    models, default_input = zip(*(_build_module(s, op) for s in sources), strict=True)
    for m, s in zip(models, sources, strict=True):  # the solver would fail obscurely on NaN
        for k, t in m.state_dict().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{op}: {s.path}: tensor {k!r} has non-finite values (NaN or inf)")
    if example_input is None and data is None:
        example_input = default_input[0]
    alignment = align(list(models), method, data, example_input=example_input, **options)  # type: ignore[arg-type]
    del models  # the streamed apply below needs the alignment only
    axes = alignment.structure.param_axes
    return lambda k, b, ts: merge_tensor(ts, axes.get(k, []), alignment)


def _build_module(src: CheckpointSource, op: str) -> tuple[nn.Module, Any]:
    """The model a checkpoint holds, with its weights, and an input to trace it with."""
    spec = src.model_spec
    if spec is not None:
        from mergelab.models import build_from_spec

        model = _with_weights(lambda: build_from_spec(spec), src.state_dict(), strict=True)
        return model.eval(), torch.zeros(2, *spec["input_shape"])
    cfg = src.config or {}
    if "model_type" in cfg and src.kind != "file":
        import transformers

        config = transformers.AutoConfig.from_pretrained(str(src.folder))  # local folder: no hub access
        if hasattr(config, "use_cache"):
            config.use_cache = False
        archs = getattr(config, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs else None
        state = src.state_dict()
        try:
            model = _with_weights(
                lambda: cls(config) if cls is not None else transformers.AutoModel.from_config(config),
                state,
                strict=False,
            )
        except _UnexpectedKey as e:
            raise ValueError(f"{op}: {src.path} holds {e.key!r}, which {e.owner} does not have") from None
        del state
        model.tie_weights()
        return model.eval(), {"input_ids": torch.zeros(1, 8, dtype=torch.long)}
    raise ValueError(
        f"{op}: cannot rebuild the model of {src.path} to align it; give a mergelab run folder or a Hugging Face "
        f"folder with its {CONFIG}"
    )


class _UnexpectedKey(Exception):
    def __init__(self, key: str, owner: str) -> None:
        self.key, self.owner = key, owner


def _with_weights(build: Callable[[], nn.Module], state: dict[str, Tensor], *, strict: bool) -> nn.Module:
    """``build()`` holding the tensors of ``state`` themselves, not copies of them.

    The model is built on the meta device and the read tensors are assigned to it, so rebuilding costs one copy
    of the weights, not two (a randomly initialised model plus the read state dict). When that cannot give a
    complete model of the usual dtypes (a tensor the checkpoint lacks, e.g. a non-persistent buffer or a tied
    weight that is not tied on load; a dtype the model would cast), it is built for real and loaded by copy.
    """
    with torch.device("meta"):
        model = build()
    expected = {k: v.dtype for k, v in model.state_dict().items()}
    same_dtypes = all(k not in expected or expected[k] == v.dtype for k, v in state.items())
    if same_dtypes:
        result = model.load_state_dict(state, strict=strict, assign=True)
        if result.unexpected_keys:
            raise _UnexpectedKey(result.unexpected_keys[0], type(model).__name__)
        complete = not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
        if complete:
            return model
    model = build()
    result = model.load_state_dict(state, strict=strict)
    if result.unexpected_keys:
        raise _UnexpectedKey(result.unexpected_keys[0], type(model).__name__)
    return model


def _statistic_names(src: CheckpointSource, keys: list[str]) -> set[str]:
    """Floating tensors that are buffers, not trained weights (averaged by the task-vector methods)."""
    spec = src.model_spec
    if spec is not None:
        from mergelab.models import build_from_spec

        with torch.device("meta"):
            model = build_from_spec(spec)
        params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        return {k for k in keys if k not in params}
    return {k for k in keys if k.endswith(_STAT_SUFFIXES)}


def _global_thresholds(
    base: CheckpointSource, sources: list[CheckpointSource], params: list[str], density: float
) -> Tensor:
    """Each model's ``keep_count``-th largest task-vector magnitude over all ``params``, exactly, in two passes.

    Non-negative floats order like their bit patterns, so pass 1 counts magnitudes by their top 16 bits and finds
    the bin holding the k-th largest; pass 2 gathers only that bin's values and selects inside it.
    """
    from mergelab.merge.task_vectors import keep_count

    if not params:
        raise ValueError("ties: trim='global' found no floating parameters")
    work = torch.float32
    for k in params:
        work = torch.promote_types(work, base.info(k).dtype)
    ibits, shift = (torch.int32, 16) if work == torch.float32 else (torch.int64, 48)
    n = len(sources)
    numel = sum(int(torch.Size(base.info(k).shape).numel()) for k in params)
    k_keep = keep_count(density, numel)

    def magnitudes() -> Iterator[Tensor]:
        for read in _prefetch([base, *sources], params):
            b = read[0].to(work).reshape(-1)
            mags = torch.empty(n, b.numel(), dtype=work)  # (N, numel)
            for i, t in enumerate(read[1:]):
                torch.sub(t.to(work).reshape(-1), b, out=mags[i]).abs_()
            del read, b
            yield mags

    hist = torch.zeros(n, 1 << 16, dtype=torch.int64)
    for mags in magnitudes():
        top = mags.view(ibits) >> shift  # (N, numel), in [0, 2^16)
        for i in range(n):
            hist[i] += torch.bincount(top[i], minlength=1 << 16)
    above = hist.flip(1).cumsum(1)  # (N, bins): entries in this bin or higher
    idx = (above >= k_keep).int().argmax(dim=1)  # first bin from the top that reaches k
    bins = (1 << 16) - 1 - idx  # (N,)
    rank = k_keep - (above.gather(1, idx[:, None]).squeeze(1) - hist.gather(1, bins[:, None]).squeeze(1))
    picked: list[list[Tensor]] = [[] for _ in range(n)]
    for mags in magnitudes():
        top = mags.view(ibits) >> shift
        for i in range(n):
            picked[i].append(mags[i][top[i] == bins[i]])
    out = torch.empty(n, dtype=work)
    for i in range(n):
        vals = torch.cat(picked[i])
        out[i] = vals.kthvalue(vals.numel() - int(rank[i]) + 1).values
    return out


# --------------------------------------------------------------------------------------------------- output
def _write_config(
    folder: Path,
    first: CheckpointSource,
    sha: Mapping[str, str],
    method: str,
    inputs: Sequence[str | Path],
    base: str | Path | None,
    options: Mapping[str, Any],
    metadata: Mapping[str, Any] | None,
) -> None:
    from mergelab._version import __version__

    merge_info = {
        "method": method,
        "inputs": [str(p) for p in inputs],
        "base": None if base is None else str(base),
        "options": {k: v for k, v in options.items() if k not in ("structure", "data")},
    }
    weights = {name: {"sha256": h} for name, h in sha.items()}
    spec = first.model_spec
    if spec is not None:
        config = {
            "mergelab_version": __version__,
            "model": spec,
            "metadata": {"merge": merge_info, **dict(metadata or {})},
            "weights": weights,
        }
        (folder / CONFIG).write_text(json.dumps(config, indent=2, default=str) + "\n")
        return
    if first.kind == "huggingface":
        for f in sorted(first.folder.iterdir()):
            skip = f.suffix in (".safetensors", *_PICKLE_SUFFIXES) or f.name in (INDEX, PROVENANCE)
            if f.is_file() and not skip and not f.name.startswith("."):
                shutil.copy2(f, folder / f.name)
    provenance = {
        "mergelab_version": __version__,
        "merge": merge_info,
        "metadata": dict(metadata or {}),
        "weights": weights,
    }
    (folder / PROVENANCE).write_text(json.dumps(provenance, indent=2, default=str) + "\n")


def _check_out(out: Path, inputs: Sequence[str | Path], op: str) -> None:
    """Refuse an output folder that is, contains or lies inside an input (``--force`` would delete it)."""
    o = out.resolve()
    for p in inputs:
        q = Path(p).resolve()
        if o == q or o in q.parents or q in o.parents:
            raise ValueError(f"{op}: --out {out} overlaps the input {p}; choose another folder")


def _prefetch(sources: Sequence[CheckpointSource], keys: Sequence[str]) -> Iterator[list[Tensor]]:
    """Every source's copy of each key in turn, reading the next key on a helper thread (reads release the GIL)
    while the caller merges the current one; at most one key is read ahead."""
    buffers = _BufferPool(2 * len(sources))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelab-reader") as pool:
        read = lambda k: [s.read(k, buffers.take(s.info(k).nbytes)) for s in sources]  # noqa: E731
        ahead = pool.submit(read, keys[0]) if keys else None
        for i in range(len(keys)):
            assert ahead is not None
            current = ahead.result()
            ahead = pool.submit(read, keys[i + 1]) if i + 1 < len(keys) else None
            yield current
            for t in current:  # the caller is done with this key's tensors (kernels never return an input)
                buffers.give(t)
            del current


class _BufferPool:
    """Byte buffers handed back after use, reused for the next tensor of the same size: fresh memory costs a
    page fault and a zeroing per page, which made reading twice as slow. Holds at most ``capacity`` buffers."""

    def __init__(self, capacity: int) -> None:
        self._free: dict[int, list[Tensor]] = {}
        self._count = 0
        self._capacity = capacity
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> Tensor | None:
        with self._lock:
            free = self._free.get(nbytes)
            if not free:
                return None
            self._count -= 1
            return free.pop()

    def give(self, t: Tensor) -> None:
        if t.numel() == 0 or not t.is_contiguous():
            return
        buf = t.reshape(-1).view(torch.uint8)
        with self._lock:
            if self._count >= self._capacity:
                # a new size while full: keep the newest sizes (layers repeat), drop one buffer of another size
                size = next((n for n, free in self._free.items() if free and n != buf.numel()), None)
                if size is None:
                    return
                self._free[size].pop()
                self._count -= 1
            self._free.setdefault(buf.numel(), []).append(buf)
            self._count += 1


def _check_finite(merged: Tensor, inputs: Sequence[Tensor], names: Sequence[str], key: str, op: str) -> None:
    """Refuse non-finite inputs, naming the first, and a merged tensor that overflowed.

    Every kernel propagates a NaN or inf of any input into its output (sums, products with masks and
    coefficients, permutations all do), so one cheap reduction over the output replaces a check of every input;
    only when it fails are the inputs searched.
    """
    if (
        not merged.is_floating_point()
        or bool(torch.isfinite(merged.sum()))
        or bool(torch.isfinite(merged).all())
    ):
        return  # a non-finite sum of finite entries is an overflow of the sum only
    for t, who in zip(inputs, names, strict=True):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{op}: {who}: tensor {key!r} has non-finite values (NaN or inf)")
    raise ValueError(f"{op}: merged tensor {key!r} overflows its dtype {merged.dtype} (inputs are finite)")


def _fmt(dtype: torch.dtype, shape: tuple[int, ...]) -> str:
    return f"{str(dtype).removeprefix('torch.')}{list(shape)}"


def _return_freed_memory() -> None:
    """Make glibc hand every freed buffer of 1 MiB or more straight back to the OS (process-wide).

    glibc's adaptive mmap threshold rises to the size of the largest buffer freed, after which tensors of that
    size come from the heap and freed ones stay mapped: streaming a model tensor by tensor then grows the peak
    RSS to about a model (measured: 166 MiB of merge memory instead of 70 for two 256 MiB inputs). A fixed
    threshold keeps the peak at the working set. No-op elsewhere than glibc.
    """
    global _MALLOPT_DONE
    if _MALLOPT_DONE:
        return
    _MALLOPT_DONE = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


_MALLOPT_DONE = False


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)
