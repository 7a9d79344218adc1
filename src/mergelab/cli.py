"""The ``mergelab`` command line: train, eval, merge, interpolate, run studies, demo.

Every sub-command has ``--help``. Results land as files (checkpoints, report.md, PNGs, JSON); an existing output
folder is never overwritten without ``--force``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
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
    if ds:
        args.data, args.data_seed, args.data_root = ds["name"], ds.get("seed", 0), ds.get("root")
    elif required:
        raise ValueError(f"{checkpoint}: no dataset recorded in the checkpoint; pass --data")


def _loader(dataset: Any, batch_size: int = 256, shuffle: bool = False) -> Any:
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


def _parse_kv(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"option {item!r} must look like key=value")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


# --------------------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from mergelab.io import prepare_run_dir, save
    from mergelab.models import build_model
    from mergelab.train import TrainConfig, train

    data = _load_data(args)
    kwargs = _parse_kv(args.model_arg)
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
    out = prepare_run_dir(args.out, force=args.force)  # refuse early, before spending time on training
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
    print(f"{args.arch} on {data.name}: test accuracy {test.accuracy:.4f}, loss {test.loss:.4f} → {out}")
    return 0


# ---------------------------------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    from mergelab.evaluation import evaluate
    from mergelab.io import load

    _data_from_checkpoint(args, args.checkpoint)
    data = _load_data(args)
    model = load(args.checkpoint)
    rows = {}
    for split in ("train", "test"):
        m = evaluate(model, _loader(getattr(data, split)))
        rows[split] = m.to_dict()
        print(f"{split:5s}  accuracy {m.accuracy:.4f}  loss {m.loss:.4f}  (n={m.count})")
    if args.json:
        print(json.dumps(rows))
    return 0


# --------------------------------------------------------------------------------------------------- merge
def cmd_merge(args: argparse.Namespace) -> int:
    from mergelab.evaluation import evaluate
    from mergelab.io import load, prepare_run_dir, save
    from mergelab.merge import get_method, merge

    info = get_method(args.method)
    options = _parse_kv(args.option)
    if args.coefficients:
        options["coefficients"] = [float(c) for c in args.coefficients.split(",")]
    if args.method in _STREAMED and not args.repair:
        return _merge_streamed(args, options)
    out = prepare_run_dir(args.out, force=args.force)
    models = [load(p) for p in args.checkpoints]
    if args.base:
        options["base"] = load(args.base)
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
        try:
            metrics["merged"] = evaluate(merged, _loader(splits.test)).to_dict()
        except (ValueError, RuntimeError) as e:  # multi-head outputs of partial zips have their own metrics
            log.info("merged model not evaluated with plain accuracy: %s", e)
        for k, v in metrics.items():
            if "accuracy" in v:
                print(f"{k:8s} test accuracy {v['accuracy']:.4f}  loss {v['loss']:.4f}")
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
    print(f"merged ({args.method}) → {out}")
    return 0


_STREAMED = ("average", "task_arithmetic", "ties", "dare", "weight_matching", "activation_matching")


def _merge_streamed(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """Merge checkpoint files tensor by tensor (any safetensors form); evaluate when a dataset is known."""
    from mergelab.io import CheckpointError, load
    from mergelab.merge.streamed import merge_checkpoints

    with contextlib.suppress(CheckpointError):  # a bare .safetensors file or HF folder: no dataset recorded
        _data_from_checkpoint(args, args.checkpoints[0], required=False)
    if args.method == "activation_matching":
        if not args.data:
            raise ValueError("method 'activation_matching' needs --data")
        options["data"] = _loader(_load_data(args).train)
    out = merge_checkpoints(
        args.checkpoints,
        args.out,
        method=args.method,
        base=args.base,
        max_shard_size=args.max_shard_size,
        progress=not args.quiet and sys.stderr.isatty(),
        force=args.force,
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
    print(f"merged ({args.method}, streamed) → {out}")
    return 0


# --------------------------------------------------------------------------------------------- interpolate
def cmd_interpolate(args: argparse.Namespace) -> int:
    from mergelab.analysis.interpolate import interpolate
    from mergelab.io import load, prepare_run_dir

    _data_from_checkpoint(args, args.a)
    out = prepare_run_dir(args.out, force=args.force)
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
    print(f"loss barrier {curve.loss_barrier:.4f}, accuracy barrier {curve.accuracy_barrier:.4f} → {out}")
    return 0


# ----------------------------------------------------------------------------------------------------- run
def cmd_run(args: argparse.Namespace) -> int:
    from mergelab.experiments import list_studies, run_study

    if args.study == "list":
        for name in list_studies():
            print(name)
        return 0
    out = args.out or f"runs/{args.study}"
    report = run_study(
        args.study,
        out,
        config_file=args.config,
        overrides=args.set,
        backend=args.backend,
        force=args.force,
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
    from mergelab.merge import METHODS, list_methods
    from mergelab.models import list_models

    print("architectures:", ", ".join(list_models()))
    print("merge methods:")
    for name in list_methods():
        print(f"  {name:22s} {METHODS[name].summary}")
    print("studies:", ", ".join(list_studies()))
    return 0


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

    p = sub.add_parser(
        "merge",
        help="merge checkpoints into one model",
        description="Merge checkpoints: mergelab run folders, .safetensors files or Hugging Face folders "
        "(sharded or not). average, task_arithmetic, ties, dare, weight_matching and activation_matching stream "
        "tensor by tensor and write sharded safetensors (Hugging Face folders stay loadable with from_pretrained); the other "
        "methods, and --repair, load zoo models into memory.",
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
        "--backend", default="local", choices=["local", "ray"], help="run jobs here or on local Ray"
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing run folder")
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        return int(args.fn(args) or 0)
    except (ValueError, TypeError, FileExistsError, FileNotFoundError) as e:
        print(f"mergelab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
