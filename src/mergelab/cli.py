"""The ``mergelab`` command line: train, eval, merge, interpolate, run studies, demo.

Every sub-command has ``--help``. Results land as files (checkpoints, report.md, PNGs, JSON); an existing output
folder is never overwritten without ``--force``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("mergelab")


def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required, help="dataset: digits | mnist1d | mnist | cifar10 | cifar100")
    p.add_argument("--data-root", default=None, help="folder with local files (mnist, cifar10, cifar100)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the dataset's split / generation")


def _load_data(args: argparse.Namespace) -> Any:
    from mergelab.data import load_dataset

    kwargs: dict[str, Any] = {}
    if args.data_root:
        kwargs["root"] = args.data_root
    if args.data in ("digits", "mnist1d"):
        kwargs["seed"] = args.data_seed
    return load_dataset(args.data, **kwargs)


def _data_from_checkpoint(args: argparse.Namespace, checkpoint: str, required: bool = True) -> None:
    """Without ``--data``, use the dataset recorded in the checkpoint's config (so ``eval CKPT`` just works)."""
    if args.data is not None:
        return
    from mergelab.io import read_config

    ds = (read_config(checkpoint).get("metadata") or {}).get("dataset") or {}
    if ds.get("name"):
        args.data, args.data_seed, args.data_root = ds["name"], ds.get("seed", 0), ds.get("root")
    elif ds and required:
        raise ValueError(f"{checkpoint}: the recorded dataset has no name ({ds}); pass --data")
    elif required:
        raise ValueError(f"{checkpoint}: no dataset recorded in the checkpoint; pass --data")


def _loader(dataset: Any, batch_size: int = 256, shuffle: bool = False) -> Any:
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


def _typed_options(fn: Any, items: Sequence[str], who: str) -> dict[str, Any]:
    """``KEY=VALUE`` strings parsed against ``fn``'s parameter types (one-line error naming key, value, type)."""
    from mergelab.options import parse_for_callable, split_kv

    return parse_for_callable(fn, split_kv(items), who)


def _check_matches_data(model: Any, data: Any, checkpoint: str) -> None:
    """A zoo model given another dataset's inputs: say so before a forward pass fails obscurely."""
    spec = getattr(model, "mergelab_spec", None) or {}
    for s in spec.get("branches", [spec]):
        if "input_shape" in s and tuple(s["input_shape"]) != tuple(data.input_shape):
            raise ValueError(
                f"{checkpoint} takes inputs of shape {tuple(s['input_shape'])} but {data.name} has "
                f"{tuple(data.input_shape)}; pass the --data it was trained on"
            )


def _tasks_of(checkpoint: str) -> Any:
    from mergelab.io import read_config

    return (
        ((read_config(checkpoint).get("metadata") or {}).get("merge") or {}).get("options", {}).get("tasks")
    )


# --------------------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from mergelab.io import RunDir, save
    from mergelab.models import build_model
    from mergelab.models.registry import get_builder
    from mergelab.train import TrainConfig, train

    kwargs = _typed_options(get_builder(args.arch), args.model_arg, f"--model-arg ({args.arch})")
    data = _load_data(args)
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        label_smoothing=args.label_smoothing,
        data_seed=args.seed if args.order_seed is None else args.order_seed,
        progress=not args.quiet,
    )
    run_dir = RunDir(args.out, force=args.force)  # refused early, before spending time on training
    out = run_dir.open()  # a temporary sibling, renamed into place when complete (main() drops it on error)
    torch.manual_seed(args.seed)
    model = build_model(args.arch, data.input_shape, data.num_classes, **kwargs)
    extra: dict[str, Any] = {}
    if args.late_phase:
        from mergelab.train.late_phase import train_late_phase

        result = train_late_phase(
            model,
            data.train,
            cfg,
            variant=args.late_phase,
            k=args.k,
            t0=args.t0,
            noise=args.late_phase_noise,
            swa=args.swa,
            swa_start=args.swa_start,
            swa_lr=args.swa_lr,
            test_data=data.test,
        )
        model, history = result.model, result.history
        extra["late_phase"] = {"variant": args.late_phase, "k": args.k, "t0": args.t0, "swa": args.swa}
    elif args.swa:
        from mergelab.train.swa import train_swa

        swa = train_swa(
            model, data.train, cfg, swa_start=args.swa_start, swa_lr=args.swa_lr, test_data=data.test
        )
        model, history = swa.model, swa.history
        extra["swa"] = {"swa_start": args.swa_start, "swa_lr": args.swa_lr, "n_averaged": swa.n_averaged}
    else:
        history = train(model, data.train, cfg, test_data=data.test)
    from mergelab.evaluation import evaluate

    test = evaluate(model, _loader(data.test))
    meta = {
        "dataset": {"name": data.name, "seed": args.data_seed, "root": args.data_root},
        "init_seed": args.seed,
        "train": cfg.to_dict(),
        "metrics": {"test_loss": test.loss, "test_accuracy": test.accuracy},
        "history": history.to_dict(),
        **extra,
    }
    save(model, out, metadata=meta, force=True)
    run_dir.commit()
    print(f"{args.arch} on {data.name}: test accuracy {test.accuracy:.4f}, loss {test.loss:.4f} → {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    from mergelab.evaluation import evaluate, evaluate_tasks
    from mergelab.io import load

    _data_from_checkpoint(args, args.checkpoint)
    data = _load_data(args)
    model = load(args.checkpoint)
    _check_matches_data(model, data, args.checkpoint)
    rows: dict[str, Any] = {}
    for split in ("train", "test"):
        loader = _loader(getattr(data, split))
        if hasattr(model, "forward_tasks"):  # one head per task: score each task, and all jointly
            per = evaluate_tasks(model, loader, _tasks_of(args.checkpoint))
            rows[split] = {k: m.to_dict() for k, m in per.items()}
            for k, m in per.items():
                print(f"{split:5s}  {k:6s} accuracy {m.accuracy:.4f}  loss {m.loss:.4f}  (n={m.count})")
            continue
        m = evaluate(model, loader)
        rows[split] = m.to_dict()
        print(f"{split:5s}  accuracy {m.accuracy:.4f}  loss {m.loss:.4f}  (n={m.count})")
    if args.json:
        print(json.dumps(rows))
    return 0


# --------------------------------------------------------------------------------------------------- merge
def cmd_merge(args: argparse.Namespace) -> int:
    from mergelab.evaluation import evaluate, evaluate_tasks
    from mergelab.io import RunDir, load, save
    from mergelab.merge import get_method, merge
    from mergelab.merge.registry import check_inputs
    from mergelab.options import parse_value

    info = get_method(args.method)
    inputs = [*args.checkpoints, *([args.base] if args.base else [])]
    run_dir = RunDir(args.out, force=args.force, inputs=inputs)
    options = _typed_options(info.fn, args.option, f"--option ({args.method})")
    if args.coefficients:
        options["coefficients"] = list(parse_value("--coefficients", args.coefficients, tuple[float, ...]))
    out = run_dir.open()  # a temporary sibling, renamed into place when complete (main() drops it on error)
    if args.method in _STREAMED and not args.repair and not {"heads", "partial"} & set(options):
        _merge_streamed(args, options, out)
        run_dir.commit()
        print(f"merged ({args.method}, streamed) → {args.out}")
        return 0
    models = [load(p) for p in args.checkpoints]
    if args.base:
        options["base"] = load(args.base)
    check_inputs(models, options, names=args.checkpoints, op=f"merge ({args.method})")
    if args.repair:
        options["repair"] = args.repair
    data = None
    _data_from_checkpoint(args, args.checkpoints[0], required=False)
    splits = _load_data(args) if args.data else None
    if splits is not None:
        data = _loader(splits.train, shuffle=False)
    elif info.needs_data:
        raise ValueError(f"method {args.method!r} needs --data")
    merged = merge(models, method=args.method, data=data, **options)
    metrics: dict[str, Any] = {}
    if splits is not None and hasattr(merged, "parameters"):
        for i, (p, m) in enumerate(zip(args.checkpoints, models, strict=True)):
            metrics[f"model{i}"] = {"path": str(p), **evaluate(m, _loader(splits.test)).to_dict()}
        if hasattr(merged, "forward_tasks"):  # one head per model: per task and joint
            per = evaluate_tasks(merged, _loader(splits.test), options.get("tasks"))
            metrics.update({f"merged {k}": m.to_dict() for k, m in per.items()})
        else:
            metrics["merged"] = evaluate(merged, _loader(splits.test)).to_dict()
        for k, v in metrics.items():
            print(f"{k:13s} test accuracy {v['accuracy']:.4f}  loss {v['loss']:.4f}")
    meta = {
        "merge": {
            "method": args.method,
            "inputs": [str(p) for p in args.checkpoints],
            "options": {k: v for k, v in options.items() if k != "base"},
        },
        "dataset": {"name": args.data, "seed": args.data_seed, "root": args.data_root} if args.data else None,
        "metrics": metrics,
    }
    save(merged, out, metadata=meta, force=True)
    run_dir.commit()
    print(f"merged ({args.method}) → {args.out}")
    return 0


_STREAMED = ("average", "task_arithmetic", "ties", "dare", "weight_matching", "activation_matching")


def _merge_streamed(args: argparse.Namespace, options: dict[str, Any], out: Path) -> None:
    """Merge checkpoint files tensor by tensor (any safetensors form) into ``out``; evaluate when a dataset is
    known."""
    from mergelab.io import CheckpointError, load
    from mergelab.merge.streamed import merge_checkpoints

    with contextlib.suppress(CheckpointError):  # a bare .safetensors file or HF folder: no dataset recorded
        _data_from_checkpoint(args, args.checkpoints[0], required=False)
    if args.method == "activation_matching":
        if not args.data:
            raise ValueError("method 'activation_matching' needs --data")
        options["data"] = _loader(_load_data(args).train)
    merge_checkpoints(
        args.checkpoints,
        out,
        method=args.method,
        base=args.base,
        max_shard_size=args.max_shard_size,
        progress=not args.quiet and sys.stderr.isatty(),
        force=True,  # `out` is the command's own temporary folder
        **options,
    )
    if args.data:
        from mergelab.evaluation import evaluate
        from mergelab.io import read_config

        splits = _load_data(args)
        metrics: dict[str, Any] = {}
        for i, p in enumerate(args.checkpoints):
            metrics[f"model{i}"] = {"path": str(p), **evaluate(load(p), _loader(splits.test)).to_dict()}
        metrics["merged"] = evaluate(load(out), _loader(splits.test)).to_dict()
        for k, v in metrics.items():
            print(f"{k:8s} test accuracy {v['accuracy']:.4f}  loss {v['loss']:.4f}")
        cfg = read_config(out)
        cfg["metadata"]["dataset"] = {"name": args.data, "seed": args.data_seed, "root": args.data_root}
        cfg["metadata"]["metrics"] = metrics
        (Path(out) / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


# --------------------------------------------------------------------------------------------- interpolate
def cmd_interpolate(args: argparse.Namespace) -> int:
    from mergelab.analysis.interpolate import interpolate
    from mergelab.io import RunDir, load

    _data_from_checkpoint(args, args.a)
    run_dir = RunDir(args.out, force=args.force, inputs=[args.a, args.b])
    out = run_dir.open()  # a temporary sibling, renamed into place when complete (main() drops it on error)
    splits = _load_data(args)
    a, b = load(args.a), load(args.b)
    if args.align != "none":
        from mergelab.merge.aligned import align_to

        b = align_to(a, b, method=args.align, data=_loader(splits.train))
    curve = interpolate(
        a,
        b,
        _loader(splits.train),
        steps=args.steps,
        test_data=_loader(splits.test),
        repair=None if args.repair == "none" else args.repair,
    )
    curve.plot(out / "curve.png")
    (out / "curve.json").write_text(json.dumps(curve.to_dict(), indent=2) + "\n")
    run_dir.commit()
    print(
        f"loss barrier {curve.loss_barrier:.4f}, accuracy barrier {curve.accuracy_barrier:.4f} → {args.out}"
    )
    return 0


# ----------------------------------------------------------------------------------------------------- run
def cmd_run(args: argparse.Namespace) -> int:
    from mergelab.experiments import list_studies, run_study

    if args.study == "list":
        for name in list_studies():
            print(name)
        return 0
    out = args.out or f"runs/{args.study}"
    # --preset / --device are the study configs' own ``preset`` / ``device`` options.
    overrides = list(args.set)
    overrides += [f"preset={args.preset}"] if args.preset else []
    overrides += [f"device={args.device}"] if args.device else []
    report = run_study(
        args.study,
        out,
        config_file=args.config,
        overrides=overrides,
        backend=args.backend,
        force=args.force,
        resume=args.resume,
        workers=args.workers,
        progress=not args.quiet,
    )
    print(f"report: {report}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mergelab.experiments import run_study

    report = run_study(
        "demo", args.out, overrides=args.set, backend=args.backend, force=args.force, progress=not args.quiet
    )
    print(Path(report).read_text())
    print(f"report: {report}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from mergelab.experiments import list_studies
    from mergelab.match.registry import SOLVERS
    from mergelab.merge import METHODS, list_methods
    from mergelab.models import list_models

    print("architectures:", ", ".join(list_models()))
    print("merge methods (options: --option KEY=VALUE):")
    for name in list_methods():
        print(f"  {name:22s} {METHODS[name].summary}")
        for o in METHODS[name].options:
            if not o.python_only:
                print(f"      {o.describe():34s} {o.help}")
    print("solvers (merge_aligned / align):", ", ".join(sorted(SOLVERS)))
    print("studies:", ", ".join(list_studies()))
    return 0


def method_options_text() -> str:
    """Every merge method with its CLI options and defaults (``mergelab merge --help``)."""
    from mergelab.merge import METHODS, list_methods

    lines = ["method options (--option KEY=VALUE; `mergelab list` describes each):"]
    for name in list_methods():
        opts = [o.describe() for o in METHODS[name].options if not o.python_only]
        lines.append(f"  {name}: {', '.join(opts) if opts else '(none)'}")
    return "\n".join(lines)


class _MergeParser(argparse.ArgumentParser):
    """The ``merge`` sub-command's parser: its help ends with every method's options, listed only when asked for
    (listing them loads every method)."""

    def format_help(self) -> str:
        return super().format_help() + "\n" + method_options_text() + "\n"


# ------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mergelab",
        description="Weight-space model merging: train, align, merge, measure and explain.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a zoo model and save a checkpoint folder")
    p.add_argument("--arch", required=True, help="zoo architecture: mlp | cnn | vgg | resnet | vit")
    _add_data_args(p)
    p.add_argument(
        "--seed", type=int, default=0, help="initialisation seed (also the data-order seed by default)"
    )
    p.add_argument("--order-seed", type=int, default=None, help="data-order seed, if different from --seed")
    p.add_argument("--out", required=True, help="run folder to create (refused if it exists, unless --force)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--optimizer", default="adam", choices=["sgd", "adam", "adamw"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "onecycle", "constant"])
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="architecture option, e.g. width=256 (repeatable)",
    )
    p.add_argument("--late-phase", choices=["bn", "rank1"], default=None, help="late-phase weights variant")
    p.add_argument("--k", type=int, default=10, help="late-phase ensemble size K")
    p.add_argument(
        "--t0", type=int, default=None, help="epoch at which the late phase starts (default 60 %%)"
    )
    p.add_argument(
        "--late-phase-noise",
        type=float,
        default=None,
        help="member initialisation noise (default 0 for bn, 0.1 for rank1)",
    )
    p.add_argument("--swa", action="store_true", help="stochastic weight averaging (alone or on late-phase)")
    p.add_argument("--swa-start", type=int, default=None, help="first averaged epoch (default 75 %%)")
    p.add_argument(
        "--swa-lr", type=float, default=None, help="constant SWA learning rate (default: keep schedule)"
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing --out folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a dataset's train and test splits")
    p.add_argument("checkpoint")
    _add_data_args(p, required=False)
    p.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    p.set_defaults(fn=cmd_eval)

    default_class, sub._parser_class = sub._parser_class, _MergeParser  # the one sub-command with lazy help
    p = sub.add_parser(
        "merge",
        help="merge checkpoints into one model",
        description="Merge checkpoints: mergelab run folders, .safetensors files or Hugging Face folders "
        "(sharded or not). average, task_arithmetic, ties, dare, weight_matching and activation_matching stream "
        "tensor by tensor and write sharded safetensors (Hugging Face folders stay loadable with from_pretrained); the other "
        "methods, --repair and the heads=/partial= options load zoo models into memory.",
    )
    p.add_argument("checkpoints", nargs="+", help="checkpoints: run folders, .safetensors files, HF folders")
    p.add_argument("--method", default="average", help="merge method (see `mergelab list`)")
    _add_data_args(p, required=False)
    p.add_argument("--out", required=True, help="checkpoint folder for the merged model")
    p.add_argument("--coefficients", default=None, help="comma-separated weights, one per model")
    p.add_argument("--base", default=None, help="base checkpoint (task_arithmetic, ties, dare)")
    p.add_argument(
        "--max-shard-size",
        default=None,
        help="split the output into shards of at most this size, e.g. 5GB or 500MB (streamed methods)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--repair", default=None, choices=["reset", "repair"], help="BatchNorm reset or REPAIR")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option, e.g. alpha=0.5 (repeatable)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing --out folder")
    p.set_defaults(fn=cmd_merge)
    sub._parser_class = default_class

    p = sub.add_parser(
        "interpolate", help="linear-mode-connectivity curve and barrier between two checkpoints"
    )
    p.add_argument("a")
    p.add_argument("b")
    _add_data_args(p, required=False)
    p.add_argument("--steps", type=int, default=11)
    p.add_argument(
        "--align",
        default="none",
        choices=["none", "weight_matching", "activation_matching"],
        help="align b to a first",
    )
    p.add_argument("--repair", default="none", choices=["none", "reset", "repair"])
    p.add_argument("--out", required=True, help="folder for curve.png and curve.json")
    p.add_argument("--force", action="store_true")
    p.set_defaults(fn=cmd_interpolate)

    p = sub.add_parser("run", help="run a study (`mergelab run list` lists them)")
    p.add_argument("study", help="study name, or 'list'")
    p.add_argument("--out", default=None, help="run folder (default runs/STUDY)")
    p.add_argument("--config", default=None, help="JSON file with study options")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one option")
    p.add_argument(
        "--preset", default=None, help="'paper': the paper's setting (local data: --set data_root=PATH)"
    )
    p.add_argument("--device", default=None, help="'auto' (CUDA when present, the default), 'cpu' or 'cuda'")
    p.add_argument(
        "--backend", default="local", choices=["local", "ray"], help="run jobs here or on local Ray"
    )
    p.add_argument(
        "--force", action="store_true", help="replace an existing run folder (when the new one is done)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse the finished jobs of an existing or interrupted run folder",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="parallel job processes (default: $MERGELAB_WORKERS, else one per core)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("demo", help="the demo study: train, merge, compare (a few minutes on CPU)")
    p.add_argument("--out", default="runs/demo", help="run folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one option")
    p.add_argument("--backend", default="local", choices=["local", "ray"])
    p.add_argument("--force", action="store_true", help="overwrite an existing run folder")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("list", help="list architectures, merge methods and studies")
    p.set_defaults(fn=cmd_list)
    return parser


# Expected failures: bad input (exit 2) or a failure while running (exit 1); anything else is a bug (exit 1).
_BAD_INPUT = (ValueError, TypeError, LookupError, FileExistsError, FileNotFoundError, NotADirectoryError)
_RUN_FAILURE = (RuntimeError, OSError, MemoryError)


def main(argv: Sequence[str] | None = None) -> int:
    from mergelab.io.run_dir import abort_unfinished

    parser = build_parser()
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    for p in parser._subparsers._group_actions[0].choices.values():  # type: ignore[union-attr]
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    logging.getLogger("mergelab.experiments.runner").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        with abort_unfinished():  # an output folder a failed command left open is dropped; the old one stays
            return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        print(f"mergelab {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`mergelab list | head`): nothing left to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        lines = str(e).strip().splitlines() or [""]
        msg = lines[0] + (" …" if len(lines) > 1 else "")
        if isinstance(e, _BAD_INPUT):
            code, what = 2, "error"
        elif isinstance(e, _RUN_FAILURE):
            code, what = 1, "failed"
        else:
            code, what = 1, f"internal error ({type(e).__name__})"
        hint = "" if args.debug else " (--debug shows the traceback)" if code == 1 else ""
        print(f"mergelab {args.command}: {what}: {msg}{hint}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
