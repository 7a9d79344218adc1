"""Merging big checkpoints: peak memory and time, mergelab versus mergekit and FusionBench on the same inputs.

Generates synthetic float32 checkpoints of ``--size-mib`` each in a temporary folder (a base and fine-tunes whose
task vectors differ in scale from layer to layer), then runs every tool and method in a fresh subprocess that
reports its wall time, its peak RSS (``VmHWM``) and its RSS right after imports (so "merge memory" = peak −
baseline is the cost of the merge itself, not of importing torch):

* ``mergelab``: :func:`mergelab.merge.streamed.merge_checkpoints` (reads tensor by tensor, writes as it goes);
* ``mergelab-memory``: today's in-memory path (load every checkpoint, ``mergelab.merge`` on modules, save);
* ``mergekit``: ``mergekit-pytorch`` (mergekit's raw-checkpoint merger, lazy loader, its own writer);
* ``fusionbench``: FusionBench's state-dict functions (``state_dict_avg``; its ``task_arithmetic_merge`` loop of
  ``state_dict_sub/add/mul``; ``ties_merging`` on the flattened model), on state dicts loaded with
  ``safetensors.torch.load_file``, result saved with ``save_file`` — FusionBench merges in memory by design.
  The ``__init__`` of ``fusion_bench.method.ties_merging`` needs ``datasets``; the benchmark imports the
  ``ties_merging_utils`` module it uses without that ``__init__`` (their code unchanged).

Semantics are matched per pair: average (uniform); task arithmetic (λ = 0.3); TIES (density 0.2, λ = 1, disjoint
mean) per tensor as mergekit does it and over the whole model (``trim="global"``) as FusionBench and the paper
do it. Each result is compared with mergelab's (max |difference|).

Install the peers with ``pip install -e ".[bench]"`` (mergekit, fusion-bench; see pyproject), then::

    python benchmarks/checkpoints.py                  # two 1 GiB inputs (+ a base), about 5 minutes on 2 cores
    python benchmarks/checkpoints.py --size-mib 256   # quicker
    python benchmarks/checkpoints.py --aligned        # also weight matching of two ~1 GiB zoo MLPs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SIDE = 2048  # tensors of SIDE × SIDE float32 = 16 MiB
LAMBDA = 0.3
IN_MEMORY = ("mergelab-memory", "fusionbench")
DENSITY = 0.2


# ------------------------------------------------------------------------------------------------ inputs
def make_inputs(folder: Path, size_mib: int, n_tunes: int) -> dict[str, Path]:
    """A base and ``n_tunes`` fine-tunes, one ``model.safetensors`` each, written tensor by tensor."""
    import torch

    from mergelab.io.writer import ShardedWriter, TensorPlan

    n_layers = max(1, size_mib // 16)
    plan = []
    for i in range(n_layers):
        plan += [TensorPlan(f"layers.{i}.weight", torch.float32, (SIDE, SIDE))]
        plan += [TensorPlan(f"layers.{i}.bias", torch.float32, (SIDE,))]
    paths = {}
    for who in ["base", *[f"ft{j}" for j in range(n_tunes)]]:
        d = folder / who
        d.mkdir()
        w = ShardedWriter(d, plan)
        for t in plan:
            g = torch.Generator().manual_seed(zlib.crc32(t.name.encode()))
            base = torch.randn(t.shape, generator=g) * 0.02
            if who != "base":
                layer = int(t.name.split(".")[1])
                g.manual_seed(zlib.crc32(f"{who}:{t.name}".encode()))
                base += torch.randn(t.shape, generator=g) * 1e-3 * (1 + layer % 4)  # scale varies by layer
            w.write(t.name, base)
        w.close()
        paths[who] = d / "model.safetensors"
    return paths


# ------------------------------------------------------------------------------------------------ workers
def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _rss_now() -> int:
    return _status("VmRSS")


def _peak_rss() -> int:
    """This process's peak RSS. Not ``ru_maxrss``: Linux carries that over ``exec`` from the forked parent, so a
    child of a big parent would report the parent's size; ``VmHWM`` belongs to the new image only."""
    return _status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(tool: str, method: str, inputs: list[str], base: str | None, out: str) -> dict[str, Any]:
    """Run one merge in this process and return time and memory."""
    import torch  # noqa: F401  (counted in the baseline for every tool)

    run = {"mergelab": _run_mergelab, "mergelab-memory": _run_memory, "mergekit": _run_mergekit}
    run["fusionbench"] = _run_fusionbench
    prepare = _prepare_fusionbench if tool == "fusionbench" else (lambda: None)
    prepare()
    if tool == "mergekit":
        import mergekit.scripts.merge_raw_pytorch  # noqa: F401
    else:  # everything the merge imports, so that the baseline holds it
        import mergelab.merge.average  # noqa: F401
        import mergelab.merge.streamed  # noqa: F401
        import mergelab.merge.task_vectors  # noqa: F401
        import mergelab.models  # noqa: F401
    baseline = _rss_now()
    t0 = time.perf_counter()
    run[tool](method, inputs, base, out)
    seconds = time.perf_counter() - t0
    peak = _peak_rss()
    return {"seconds": seconds, "peak": peak, "baseline": baseline}


def _split(method: str) -> tuple[str, str]:
    return (method[: -len("-global")], "global") if method.endswith("-global") else (method, "per_tensor")


def _run_mergelab(method: str, inputs: list[str], base: str | None, out: str) -> None:
    from mergelab.merge.streamed import merge_checkpoints

    name, trim = _split(method)
    options: dict[str, Any] = {
        "average": {},
        "task_arithmetic": {"scaling": LAMBDA},
        "ties": {"density": DENSITY, "trim": trim},
    }[name]
    merge_checkpoints(inputs, out, method=name, base=base, verify=False, **options)


def _run_memory(method: str, inputs: list[str], base: str | None, out: str) -> None:
    """Today's in-memory path: every checkpoint loaded as a module, merged, saved."""
    import torch
    from safetensors.torch import load_file, save_file
    from torch import nn

    from mergelab.merge import merge

    def module(path: str) -> nn.Module:
        m = nn.Module()
        for k, v in load_file(path).items():
            m.register_parameter(k.replace(".", "__"), nn.Parameter(v, requires_grad=False))
        return m

    name, trim = _split(method)
    models = [module(p) for p in inputs]
    options: dict[str, Any] = {"average": {}, "task_arithmetic": {"scaling": LAMBDA}}.get(name, {})
    if name == "ties":
        options = {"density": DENSITY, "trim": trim}
    if base is not None:
        options["base"] = module(base)
    merged = merge(models, method=name, **options)
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(
        {k.replace("__", "."): v.contiguous() for k, v in merged.state_dict().items()},
        f"{out}/model.safetensors",
    )
    del torch


def _run_mergekit(method: str, inputs: list[str], base: str | None, out: str) -> None:
    import yaml
    from click.testing import CliRunner
    from mergekit.scripts.merge_raw_pytorch import main

    name, _ = _split(method)
    if name == "average":
        cfg = {"merge_method": "linear", "parameters": {"normalize": True}}
        models = [{"model": p, "parameters": {"weight": 1.0}} for p in inputs]
    elif name == "task_arithmetic":
        cfg = {"merge_method": "task_arithmetic", "base_model": base, "parameters": {"normalize": False}}
        models = [{"model": p, "parameters": {"weight": LAMBDA}} for p in inputs]
    else:
        cfg = {"merge_method": "ties", "base_model": base, "parameters": {"normalize": True}}
        models = [{"model": p, "parameters": {"weight": 1.0, "density": DENSITY}} for p in inputs]
    cfg.update({"models": models, "dtype": "float32", "out_dtype": "float32"})
    cfg_file = Path(out + ".yml")
    cfg_file.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(main, [str(cfg_file), out], catch_exceptions=False)
    if result.exit_code != 0:
        raise RuntimeError(f"mergekit-pytorch failed: {result.output[-500:]}")


def _prepare_fusionbench() -> None:
    """Make fusion_bench.method.ties_merging.ties_merging_utils importable without its package's __init__."""
    import importlib.util
    import types

    spec = importlib.util.find_spec("fusion_bench")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("fusion_bench is not installed (pip install -e '.[bench]')")
    import fusion_bench.method  # noqa: F401  (imports; its ties_merging subpackage's __init__ does not)

    root = Path(next(iter(spec.submodule_search_locations)))
    mod = types.ModuleType("fusion_bench.method.ties_merging")
    mod.__path__ = [str(root / "method" / "ties_merging")]
    sys.modules[mod.__name__] = mod


def _run_fusionbench(method: str, inputs: list[str], base: str | None, out: str) -> None:
    import torch
    from fusion_bench.utils.state_dict_arithmetic import (
        state_dict_add,
        state_dict_avg,
        state_dict_mul,
        state_dict_sub,
    )
    from safetensors.torch import load_file, save_file

    name, _ = _split(method)
    models = [load_file(p) for p in inputs]
    if name == "average":
        merged = state_dict_avg(models)
    elif name == "task_arithmetic":  # the loop of fusion_bench's task_arithmetic_merge, on state dicts
        assert base is not None
        ptm = load_file(base)
        tv = None
        for sd in models:
            tv = state_dict_sub(sd, ptm) if tv is None else state_dict_add(tv, state_dict_sub(sd, ptm))
        merged = state_dict_add(ptm, state_dict_mul(tv, LAMBDA))
    else:  # TiesMergingAlgorithm.run, on state dicts
        from fusion_bench.method.ties_merging.ties_merging_utils import (
            state_dict_to_vector,
            ties_merging,
            vector_to_state_dict,
        )

        assert base is not None
        ptm = load_file(base)
        flat_ft = torch.vstack([state_dict_to_vector(sd, []) for sd in models])
        flat_ptm = state_dict_to_vector(ptm, [])
        tv = flat_ft - flat_ptm
        del flat_ft
        merged_tv = ties_merging(tv, reset_thresh=DENSITY, merge_func="mean")
        merged = vector_to_state_dict(flat_ptm + 1.0 * merged_tv, ptm, remove_keys=[])
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in merged.items()}, f"{out}/model.safetensors")


# ------------------------------------------------------------------------------------------------ driver
def _output_file(out: Path) -> list[Path]:
    return sorted(out.glob("*.safetensors"))


def max_difference(a: Path, b: Path) -> float:
    """Largest |a − b| over every tensor of two output folders, read one tensor at a time."""
    from mergelab.io.sources import open_checkpoint

    def src(folder: Path) -> Any:
        files = _output_file(folder)
        return open_checkpoint(folder if len(files) != 1 else files[0])

    worst = 0.0
    with src(a) as sa, src(b) as sb:
        for k in sa:
            worst = max(worst, float((sa.read(k).double() - sb.read(k).double()).abs().max()))
    return worst


def run_one(tool: str, method: str, inputs: list[Path], base: Path | None, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", tool, method, str(out), *map(str, inputs)]
    if base is not None:
        cmd += ["--base", str(base)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:160]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=1024, help="size of each input checkpoint")
    p.add_argument("--tunes", type=int, default=2, help="fine-tuned inputs (and one base)")
    p.add_argument("--tools", default="mergelab,mergelab-memory,mergekit,fusionbench")
    p.add_argument("--methods", default="average,task_arithmetic,ties,ties-global")
    p.add_argument("--repeat", type=int, default=1, help="runs per tool and method (fastest time is kept)")
    p.add_argument(
        "--aligned", action="store_true", help="also weight matching of two zoo MLPs of --size-mib"
    )
    p.add_argument(
        "--max-flat-mib",
        type=int,
        default=256,
        help="run the in-memory global TIES (about 20× one model in RAM) only up to this input size",
    )
    p.add_argument(
        "--aligned-modes",
        default="memory,streamed",
        help="which aligned runs: memory (load + mergelab.merge + save) and/or streamed (merge_checkpoints)",
    )
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--base", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        tool, method, out, *inputs = args.worker
        if tool == "aligned":
            print(json.dumps(aligned_worker(method, inputs, out)))
        else:
            print(json.dumps(worker(tool, method, inputs, args.base, out)))
        return

    import platform

    import torch

    print(
        f"# checkpoints benchmark: {args.size_mib} MiB float32 inputs, {args.tunes} fine-tunes + base; "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    )
    for pkg in ("mergekit", "fusion_bench"):
        try:
            from importlib.metadata import version

            print(f"# {pkg} {version(pkg.replace('_', '-'))}")
        except Exception:
            print(f"# {pkg} not installed")
    with tempfile.TemporaryDirectory(prefix="mergelab-bench-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        paths = make_inputs(folder, args.size_mib, args.tunes)
        model_bytes = paths["base"].stat().st_size
        print(
            f"# inputs written in {time.perf_counter() - t0:.1f} s; one model = {model_bytes / 2**20:.0f} MiB"
        )
        print()
        header = f"{'method':16s} {'tool':16s} {'time s':>7s} {'peak RSS MiB':>12s} {'merge MiB':>9s} "
        header += f"{'% of model':>10s} {'max |diff| vs mergelab':>22s}"
        print(header)
        tunes = [paths[f"ft{j}"] for j in range(args.tunes)]
        for method in args.methods.split(","):
            name, trim = _split(method)
            inputs = tunes if name != "average" else tunes[:2]
            base = paths["base"] if name != "average" else None
            ref: Path | None = None
            for tool in args.tools.split(","):
                if tool == "mergekit" and trim == "global":
                    continue  # mergekit trims per tensor only
                if tool == "fusionbench" and name == "ties" and trim == "per_tensor":
                    continue  # FusionBench trims the flattened model only
                if tool in IN_MEMORY and method == "ties-global" and args.size_mib > args.max_flat_mib:
                    print(f"{method:16s} {tool:16s} skipped: flattens every model in memory (~20× one model)")
                    continue
                out = folder / f"out-{method}-{tool}"
                r = run_one(tool, method, inputs, base, out)
                for _ in range(args.repeat - 1):  # shared machines: keep the fastest run, the largest peak
                    if "error" in r:
                        break
                    _rmtree(out)
                    again = run_one(tool, method, inputs, base, out)
                    if "error" not in again:
                        r = {**again, "seconds": min(r["seconds"], again["seconds"])}
                        r["peak"] = max(r["peak"], again["peak"])
                if "error" in r:
                    print(f"{method:16s} {tool:16s} failed: {r['error']}")
                    continue
                merge_mib = (r["peak"] - r["baseline"]) / 2**20
                if tool == "mergelab":
                    ref, diff = out, "—"
                else:
                    diff = f"{max_difference(ref, out):.2e}" if ref is not None else "?"
                print(
                    f"{method:16s} {tool:16s} {r['seconds']:7.1f} {r['peak'] / 2**20:12.0f} {merge_mib:9.0f} "
                    f"{100 * merge_mib * 2**20 / model_bytes:9.0f}% {diff:>22s}",
                    flush=True,
                )
                if tool != "mergelab":
                    _rmtree(out)
            if ref is not None:
                _rmtree(ref)
        if args.aligned:
            for p_ in paths.values():
                p_.unlink()
            run_aligned(folder, args.size_mib, args.aligned_modes.split(","))


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ aligned
def run_aligned(folder: Path, size_mib: int, modes: Sequence[str] = ("memory", "streamed")) -> None:
    """Weight matching of two zoo MLPs of about ``size_mib`` each: in memory (today) vs streamed apply."""
    import torch

    import mergelab

    width = 2048
    depth = max(1, size_mib // 16)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = mergelab.build_model("mlp", (1, 32, 32), 10, width=width, depth=depth)
        paths.append(mergelab.save(model, folder / f"mlp{seed}"))
        del model
    model_bytes = (paths[0] / "model.safetensors").stat().st_size
    print()
    print(
        f"# weight matching: two zoo MLPs (width {width}, depth {depth}), {model_bytes / 2**20:.0f} MiB each"
    )
    for mode in modes:
        out = folder / f"wm-{mode}"
        cmd = [sys.executable, __file__, "--worker", "aligned", mode, str(out), *map(str, paths)]
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"weight_matching  {mode:16s} failed: {proc.stderr.strip().splitlines()[-1][:160]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        merge_mib = (r["peak"] - r["baseline"]) / 2**20
        print(
            f"weight_matching  {mode:16s} {r['seconds']:7.1f} s, peak RSS {r['peak'] / 2**20:.0f} MiB, "
            f"merge {merge_mib:.0f} MiB = {merge_mib * 2**20 / model_bytes:.2f}× one model",
            flush=True,
        )
    a, b = (folder / "wm-memory" / "model.safetensors"), (folder / "wm-streamed" / "model.safetensors")
    if a.exists() and b.exists():
        print(f"# max |diff| streamed vs in memory: {max_difference(a.parent, b.parent):.2e}")


def aligned_worker(mode: str, inputs: list[str], out: str) -> dict[str, Any]:
    import mergelab
    from mergelab.merge.streamed import merge_checkpoints

    baseline = _rss_now()
    t0 = time.perf_counter()
    if mode == "memory":  # what `mergelab merge --method weight_matching` did before streaming
        models = [mergelab.load(p) for p in inputs]
        merged = mergelab.merge(models, method="weight_matching", max_iter=3)
        mergelab.save(merged, out)
    else:
        merge_checkpoints(inputs, out, method="weight_matching", max_iter=3)
    seconds = time.perf_counter() - t0
    peak = _peak_rss()
    return {"seconds": seconds, "peak": peak, "baseline": baseline}


if __name__ == "__main__":
    main()
