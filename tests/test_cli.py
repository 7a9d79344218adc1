"""The CLI runs end to end on tiny settings and reports bad input clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mergelab.cli import main


def _train(out: Path, seed: int) -> None:
    code = main(
        [
            "train",
            "--arch",
            "mlp",
            "--data",
            "digits",
            "--seed",
            str(seed),
            "--epochs",
            "2",
            "--model-arg",
            "width=16",
            "--model-arg",
            "depth=1",
            "--out",
            str(out),
            "-q",
        ]
    )
    assert code == 0


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    _train(root / "a", 0)
    _train(root / "b", 1)
    return root / "a", root / "b"


def test_train_writes_a_checkpoint(two_runs: tuple[Path, Path]) -> None:
    a, _ = two_runs
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["model"]["arch"] == "mlp"
    assert cfg["metadata"]["dataset"]["name"] == "digits"
    assert 0.0 <= cfg["metadata"]["metrics"]["test_accuracy"] <= 1.0
    assert (a / "model.safetensors").is_file()


def test_train_refuses_to_overwrite(two_runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    a, _ = two_runs
    before = (a / "model.safetensors").read_bytes()
    code = main(["train", "--arch", "mlp", "--data", "digits", "--epochs", "1", "--out", str(a), "-q"])
    assert code == 2
    assert "--force" in capsys.readouterr().err
    assert (a / "model.safetensors").read_bytes() == before


def test_eval_uses_the_recorded_dataset(
    two_runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", str(two_runs[0]), "--json"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads(out.strip().splitlines()[-1])
    assert set(metrics) == {"train", "test"}


def test_merge_average(
    two_runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged"
    assert main(["merge", str(two_runs[0]), str(two_runs[1]), "--method", "average", "--out", str(out)]) == 0
    assert "merged" in capsys.readouterr().out
    meta = json.loads((out / "config.json").read_text())["metadata"]
    assert meta["merge"]["method"] == "average"
    assert "accuracy" in meta["metrics"]["merged"]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "--arch", "transformerXL", "--data", "digits", "--epochs", "1"], "transformerXL"),
        (["train", "--arch", "mlp", "--data", "imagenet", "--epochs", "1"], "imagenet"),
        (["merge", "nope-a", "nope-b", "--method", "average"], "does not exist"),
        (["merge", "nope-a", "nope-b", "--method", "soup-of-the-day"], "soup-of-the-day"),
        (["run", "no-such-study"], "no-such-study"),
    ],
)
def test_bad_input_names_the_problem(
    argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if argv[0] in ("train", "merge"):
        argv = [*argv, "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize(
    "cmd", [[], ["train"], ["eval"], ["merge"], ["interpolate"], ["run"], ["demo"], ["list"]]
)
def test_help_everywhere(cmd: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*cmd, "--help"])
    assert exc.value.code == 0
    assert "usage: mergelab" in capsys.readouterr().out


def test_console_script_entry_point() -> None:
    res = subprocess.run([sys.executable, "-m", "mergelab.cli", "list"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    for name in ("weight_matching", "zipit", "ties", "mlp", "lmc"):
        assert name in res.stdout
    # every method's options, with defaults and one line of help from its docstring
    assert "zip_alpha=0.5" in res.stdout and "seeds the random drops" in res.stdout


def test_merge_help_lists_every_methods_options(capsys: pytest.CaptureFixture[str]) -> None:
    from mergelab.merge import METHODS, list_methods

    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    out = capsys.readouterr().out
    for name in list_methods():
        line = next(x for x in out.splitlines() if x.strip().startswith(f"{name}:"))
        assert all(o.describe() in line for o in METHODS[name].options if not o.python_only), name


def test_demo_runs_on_tiny_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--out",
            str(out),
            "-q",
            "--set",
            "epochs=2",
            "--set",
            "width=16",
            "--set",
            'methods=["average"]',
            "--set",
            "interpolation_steps=3",
        ]
    )
    assert code == 0
    report = (out / "report.md").read_text()
    assert "merge: average" in report and "output ensemble" in report
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["metrics"]["table"]) == 4
    assert main(["demo", "--out", str(out), "-q"]) == 2  # never overwritten without --force


@pytest.mark.parametrize("method", ["weight_matching", "activation_matching"])
def test_merge_aligned_with_repair(two_runs: tuple[Path, Path], tmp_path: Path, method: str) -> None:
    out = tmp_path / method
    argv = [
        "merge",
        str(two_runs[0]),
        str(two_runs[1]),
        "--method",
        method,
        "--repair",
        "repair",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    meta = json.loads((out / "config.json").read_text())["metadata"]
    assert meta["merge"]["options"]["repair"] == "repair"
    assert 0.0 <= meta["metrics"]["merged"]["accuracy"] <= 1.0


def test_interpolate_writes_curve_and_plot(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "lmc"
    argv = [
        "interpolate",
        str(two_runs[0]),
        str(two_runs[1]),
        "--align",
        "weight_matching",
        "--steps",
        "3",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    curve = json.loads((out / "curve.json").read_text())
    assert len(curve["lambdas"]) == 3
    assert (out / "curve.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "extra",
    [
        ["--late-phase", "bn", "--k", "2", "--t0", "1"],
        ["--late-phase", "rank1", "--k", "2", "--t0", "1", "--swa"],
        ["--swa", "--swa-start", "1"],
    ],
    ids=["late-phase-bn", "late-phase-rank1-swa", "swa"],
)
def test_train_late_phase_and_swa(extra: list[str], tmp_path: Path) -> None:
    out = tmp_path / "lp"
    argv = [
        "train",
        "--arch",
        "resnet",
        "--model-arg",
        "depth=8",
        "--data",
        "digits",
        "--epochs",
        "2",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--out",
        str(out),
        "-q",
        *extra,
    ]
    assert main(argv) == 0
    meta = json.loads((out / "config.json").read_text())["metadata"]
    assert ("late_phase" in meta) == ("--late-phase" in extra)
    from mergelab.io import load

    model = load(out)  # the averaged model is a plain zoo model
    assert model.head.out_features == 10


def test_late_phase_bad_options_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "train",
        "--arch",
        "mlp",
        "--data",
        "digits",
        "--epochs",
        "2",
        "--late-phase",
        "bn",
        "--k",
        "2",
        "--out",
        str(tmp_path / "x"),
        "-q",
    ]
    assert main(argv) == 2  # an MLP without norm layers has nothing for `bn` to keep per member
    assert "norm" in capsys.readouterr().err.lower()


@pytest.mark.parametrize(
    "method,options", [("zipit", ["alpha=0.5", "beta=1"]), ("mudsc", ["alpha=0.5", "mode=zip"])]
)
def test_merge_zipit_and_mudsc(
    two_runs: tuple[Path, Path], tmp_path: Path, method: str, options: list[str]
) -> None:
    out = tmp_path / method
    argv = [
        "merge",
        str(two_runs[0]),
        str(two_runs[1]),
        "--method",
        method,
        "--data",
        "digits",
        "--out",
        str(out),
    ]
    for opt in options:
        argv += ["--option", opt]
    assert main(argv) == 0
    meta = json.loads((out / "config.json").read_text())["metadata"]
    assert meta["merge"]["method"] == method
    assert (out / "model.safetensors").is_file()
