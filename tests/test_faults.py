"""Fault suite: kills, bad inputs and races never lose data, and every failure names its problem in one line.

Each case asserts two things: what existed before is intact (bit for bit), and the message names the problem
(the path, the key, the tensor). Models are tiny and untrained unless training matters, so the suite is cheap.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import mergelab
import mergelab.evaluation
from mergelab.cli import main
from mergelab.experiments.runner import Executor, build_config
from mergelab.io import RunDir, RunDirBusyError
from mergelab.models import build_model
from mergelab.options import OptionError

DIGITS = {"dataset": {"name": "digits", "seed": 0}}


def _ckpt(path: Path, seed: int = 0, depth: int = 1) -> Path:
    torch.manual_seed(seed)
    model = build_model("mlp", (1, 8, 8), 10, width=8, depth=depth)
    return mergelab.save(model, path, metadata=DIGITS)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _siblings(folder: Path) -> list[str]:
    """Names beside ``folder`` other than itself: temporary or lock files a failure might leave behind."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err


# --------------------------------------------------------------------------------------- writes that cannot destroy
def test_force_onto_an_input_is_refused_and_the_input_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = _ckpt(tmp_path / "fa"), _ckpt(tmp_path / "fb", seed=1)
    before = _snapshot(a)
    for out, needle in [(a, "is the input"), (a / "sub", "lies inside the input"), (tmp_path, "contains")]:
        assert main(["merge", str(a), str(b), "--out", str(out), "--force"]) == 2
        assert needle in _err(capsys)
        assert _snapshot(a) == before
    assert _siblings(a) == ["fb"]


def test_current_and_home_folders_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--arch", "mlp", "--data", "digits", "--epochs", "1", "-q", "--force", "--out"]
    assert main([*argv, "."]) == 2
    assert "current folder" in _err(capsys)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    assert main([*argv, str(tmp_path / "home")]) == 2
    assert "home folder" in _err(capsys)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_force_replaces_only_mergelab_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _ckpt(tmp_path / "a"), _ckpt(tmp_path / "b", seed=1)
    user = tmp_path / "notes"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    assert main(["merge", str(a), str(b), "--out", str(user), "--force"]) == 2
    assert "does not look like a mergelab output" in _err(capsys)
    assert (user / "thesis.tex").read_text() == "years of work"


def test_a_failed_or_interrupted_run_keeps_the_folder_it_would_replace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _ckpt(tmp_path / "run")
    before = _snapshot(out)
    argv = ["train", "--arch", "mlp", "--data", "digits", "--epochs", "1", "-q", "--force", "--out", str(out)]
    import mergelab.train  # noqa: F401  (the package; `mergelab.train` the attribute is the function)

    train_module = sys.modules["mergelab.train"]
    for exc, code, needle in [
        (RuntimeError("disk on fire"), 1, "disk on fire"),
        (KeyboardInterrupt(), 130, ""),
    ]:

        def boom(*a: object, exc: BaseException = exc, **k: object) -> None:
            raise exc

        monkeypatch.setattr(train_module, "train", boom)
        assert main(argv) == code
        assert needle in _err(capsys)
        assert _snapshot(out) == before
        assert _siblings(out) == []  # no temporary folder or lock left behind


def test_force_replaces_at_the_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _ckpt(tmp_path / "a"), _ckpt(tmp_path / "b", seed=1)
    out = tmp_path / "merged"
    assert main(["merge", str(a), str(b), "--out", str(out)]) == 0
    first = _snapshot(out)
    assert main(["merge", str(a), str(b), "--out", str(out)]) == 2  # a second run into the same --out
    assert "already exists" in _err(capsys)
    assert _snapshot(out) == first
    assert main(["merge", str(a), str(b), "--out", str(out), "--coefficients", "0.9,0.1", "--force"]) == 0
    assert _snapshot(out) != first and _siblings(out) == ["a", "b"]
    assert mergelab.load(out).head.weight.shape == (10, 8)


def test_concurrent_writers_the_second_fails_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = _ckpt(tmp_path / "a"), _ckpt(tmp_path / "b", seed=1)
    out = tmp_path / "merged"
    with RunDir(out) as tmp:  # another writer holds the folder (flock: same as from another process)
        assert main(["merge", str(a), str(b), "--out", str(out)]) == 1
        assert "another mergelab process is writing" in _err(capsys)
        assert not out.exists()  # a partial folder never looks complete
        (tmp / "config.json").write_text("{}")
        with pytest.raises(RunDirBusyError, match=str(out)):
            RunDir(out).open()
    assert json.loads((out / "config.json").read_text()) == {}  # the first writer's result is intact


def test_a_killed_writer_leaves_nothing_that_looks_complete(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    code = (
        "import os, mergelab\n"
        "from mergelab.io import RunDir\n"
        f"rd = RunDir({str(out)!r}); tmp = rd.open()\n"
        "(tmp / 'config.json').write_text('{}')\n"
        "os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": _src()})
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    _ckpt(out)  # the next writer cleans up after the killed one
    assert _siblings(out) == []


# ------------------------------------------------------------------------------------------------ resumable studies
_DEMO = ["--set", "epochs=2", "--set", "width=8", "--set", "depth=1", "--set", "seeds=0,1,2,3"]
_DEMO += ["--set", "methods=average", "--set", "interpolation_steps=3", "-q"]


def _src() -> str:
    return str(Path(mergelab.__file__).resolve().parents[1])


def test_a_killed_study_resumes_with_the_same_metrics_and_no_recomputation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    partial = tmp_path / "demo.partial"
    argv = [sys.executable, "-m", "mergelab.cli", "run", "demo", "--out", str(out), "--workers", "2", *_DEMO]
    proc = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": _src()}, stderr=subprocess.DEVNULL)
    jobs = partial / "jobs"
    deadline = time.monotonic() + 240
    while not (jobs.is_dir() and list(jobs.glob("*.json"))) and proc.poll() is None:
        if time.monotonic() > deadline:  # a hang guard, not a speed goal
            pytest.fail("the study produced no job result")
        time.sleep(0.02)
    workers = _descendants(proc.pid)
    proc.send_signal(signal.SIGKILL)  # mid-run: at least one job finished, the report not yet written
    proc.wait()
    assert not out.exists() and not (partial / "report.md").exists()
    done = sorted(p.name for p in jobs.glob("*.json"))
    assert 1 <= len(done) <= 4
    _wait_gone(workers)  # the worker processes do not outlive their driver

    before = {n: (jobs / n).read_bytes() for n in done}
    changed = ["run", "demo", "--out", str(out), "--workers", "1", *_DEMO, "--set", "lr=0.01"]
    assert main(changed) == 2  # a different config is refused, naming the key; nothing is lost
    assert "lr" in _err(capsys) and {n: (jobs / n).read_bytes() for n in done} == before

    caplog.set_level("INFO", logger="mergelab.experiments.runner")
    assert main(["run", "demo", "--out", str(out), "--workers", "1", "--resume", *_DEMO]) == 0
    assert f"reused {len(done)} of 4 jobs" in caplog.text
    assert f"computed {4 - len(done)}" in caplog.text
    assert not partial.exists() and (out / "report.md").is_file()
    assert all((out / "jobs" / n).read_bytes() == b for n, b in before.items())  # finished jobs untouched

    ref = tmp_path / "ref"
    assert main(["run", "demo", "--out", str(ref), "--workers", "1", *_DEMO]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics == json.loads((ref / "metrics.json").read_text())["metrics"]

    caplog.clear()  # --resume of a complete run recomputes nothing
    assert main(["run", "demo", "--out", str(out), "--workers", "1", "--resume", *_DEMO]) == 0
    assert "reused 4 of 4 jobs" in caplog.text and "computed 0" in caplog.text


def _descendants(pid: int) -> list[int]:
    from mergelab.experiments._watchdog import _descendants

    return list(_descendants(pid))


def _wait_gone(pids: list[int], timeout: float = 15.0) -> None:
    from mergelab.experiments._watchdog import _stat

    deadline = time.monotonic() + timeout
    while any(_stat(p) for p in pids):
        if time.monotonic() > deadline:  # a hang guard, not a speed goal
            pytest.fail(f"processes {[p for p in pids if _stat(p)]} outlived their driver")
        time.sleep(0.1)


def test_executor_caches_each_job_as_it_finishes(tmp_path: Path) -> None:
    ex = Executor(progress=False, workers=1, cache=tmp_path / "jobs")
    jobs = [{"x": torch.arange(3.0) * i, "name": ("a", i)} for i in range(3)]
    first = ex.map(_job, jobs)
    again = Executor(progress=False, workers=1, cache=tmp_path / "jobs")
    second = again.map(_job, jobs)
    assert (again.reused, again.computed) == (3, 0)
    for r1, r2 in zip(first, second, strict=True):
        assert r1.keys() == r2.keys() and torch.equal(r1["y"], r2["y"]) and r1["meta"] == r2["meta"]
        assert r1["m"] == r2["m"]


def _job(job: dict) -> dict:
    from mergelab.evaluation import Metrics

    return {
        "y": job["x"] * 2,
        "meta": (job["name"], {"n": 1.5, (1, 2): [None, True]}),
        "m": Metrics(0.5, 1.0, 3),
    }


# ----------------------------------------------------------------------------------------------------- typed options
@pytest.mark.parametrize(
    "setting, needle",
    [
        ("epochs=abc", "epochs='abc': expected an integer"),
        ("seed_pairs=0", "seed_pairs='0': expected at least 1"),
        ("epochs=0", "epochs='0': expected at least 1"),
        ("lr=nan", "lr='nan': expected a finite number"),
        ("widths=8,x", "'x' is not an integer"),
        ("colour=red", "unknown option"),
    ],
)
def test_bad_study_option_is_one_line_and_writes_nothing(
    setting: str, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "lmc", "--out", str(tmp_path / "o"), "--set", setting]) == 2
    err = _err(capsys)
    assert needle in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_study_options_are_parsed_by_field_type() -> None:
    from mergelab.experiments.lmc import LMCConfig

    cfg = build_config(LMCConfig, None, ["archs=mlp", "widths=[8, 16]", "datasets=digits,mnist1d", "lr=0.5"])
    assert cfg.archs == ("mlp",) and cfg.widths == (8, 16) and cfg.datasets == ("digits", "mnist1d")
    assert cfg.lr == 0.5
    with pytest.raises(OptionError, match="archs"):
        build_config(LMCConfig, None, ["archs=[1, 2]"])


def test_bad_model_arg_names_key_value_and_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--arch", "mlp", "--data", "digits", "--out", str(tmp_path / "o"), "-q"]
    assert main([*argv, "--model-arg", "width=abc"]) == 2
    assert "width='abc': expected an integer" in _err(capsys)
    assert main([*argv, "--model-arg", "colour=1"]) == 2
    assert "unknown option 'colour'" in _err(capsys)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ silent wrong results
def test_nan_coefficients_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _ckpt(tmp_path / "a"), _ckpt(tmp_path / "b", seed=1)
    assert main(["merge", str(a), str(b), "--coefficients", "nan,1", "--out", str(tmp_path / "m")]) == 2
    assert "--coefficients" in _err(capsys) and not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match="coefficients"):
        mergelab.merge([mergelab.load(a), mergelab.load(b)], coefficients=[float("nan"), 1.0])


@pytest.mark.parametrize("method", ["average", "activation_matching", "zipit", "mudsc", "weight_matching"])
def test_non_finite_weights_are_refused_as_merge_inputs(method: str) -> None:
    torch.manual_seed(0)
    a, b = (
        build_model("mlp", (1, 8, 8), 10, width=8, depth=1),
        build_model("mlp", (1, 8, 8), 10, width=8, depth=1),
    )
    with torch.no_grad():
        b.layers[0].weight[0, 0] = float("nan")
    data = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))]
    with pytest.raises(ValueError, match=r"model 1 has non-finite weights \(NaN/inf\) in 'layers.0.weight'"):
        mergelab.merge([a, b], method=method, data=data)
    from mergelab.merge.average import average

    with pytest.raises(ValueError, match="model 1 has non-finite"):  # direct calls are checked too
        average([a, b])


def test_mixed_dtypes_are_named() -> None:
    a, b = nn.Linear(3, 2), nn.Linear(3, 2).double()
    with pytest.raises(ValueError, match=r"'weight' as torch.float64 but model 0 as torch.float32"):
        mergelab.merge([a, b])


def test_multi_head_merges_save_load_and_are_scored_per_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = _ckpt(tmp_path / "a", depth=2), _ckpt(tmp_path / "b", seed=1, depth=2)
    for option in ["heads=concat", "partial=1"]:  # partial: the first of two hidden layers merged
        out = tmp_path / option.replace("=", "_")
        argv = ["merge", str(a), str(b), "--method", "zipit", "--option", option, "--out", str(out)]
        assert main(argv) == 0
        report = capsys.readouterr().out
        assert "merged task0" in report and "merged joint" in report
        spec = json.loads((out / "config.json").read_text())["model"]
        assert spec["kind"] == "multihead" and len(spec["branches"]) == 2
        assert main(["eval", str(out)]) == 0
        lines = capsys.readouterr().out
        assert "task0" in lines and "task1" in lines and "joint" in lines
    merged = mergelab.load(tmp_path / "heads_concat")
    x = torch.randn(4, 1, 8, 8)
    assert merged(x).shape == (4, 20)
    with pytest.raises(ValueError, match="evaluate_tasks"):  # 20 logits are not 10-class accuracy
        mergelab.evaluation.evaluate(merged, [(x, torch.zeros(4, dtype=torch.long))])


def test_evaluate_tasks_maps_columns_to_classes() -> None:
    from mergelab.evaluation import evaluate_tasks

    class TwoHeads(nn.Module):
        def forward_tasks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x[:, :2], x[:, 2:]

    x = torch.tensor([[5.0, 0, 0, 0], [0, 0, 0, 5.0], [0, 0, 5.0, 0]])
    y = torch.tensor([0, 3, 2])  # head 0 predicts classes 0, 2; head 1 predicts 1, 3
    m = evaluate_tasks(TwoHeads(), [(x, y)], tasks=[[0, 2], [1, 3]])
    assert m["joint"].accuracy == pytest.approx(2 / 3) and m["joint"].count == 3
    assert (m["task0"].count, m["task0"].accuracy) == (2, 0.5)
    assert (m["task1"].count, m["task1"].accuracy) == (1, 1.0)


def test_corrupted_weights_are_refused_on_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _ckpt(tmp_path / "a")
    weights = a / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-8:] = b"\xff" * 8  # payload bytes (not the header): the file still parses
    weights.write_bytes(bytes(raw))
    assert main(["eval", str(a)]) == 2
    assert "model.safetensors" in _err(capsys)


# -------------------------------------------------------------------------------------------------------- clear errors
def test_model_of_another_dataset_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _ckpt(tmp_path / "a")
    assert main(["eval", str(a), "--data", "mnist1d"]) == 2
    err = _err(capsys)
    assert "(1, 8, 8)" in err and "mnist1d" in err


def test_config_without_dataset_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _ckpt(tmp_path / "a")
    cfg = json.loads((a / "config.json").read_text())
    cfg["metadata"]["dataset"] = {"seed": 0}
    (a / "config.json").write_text(json.dumps(cfg))
    assert main(["eval", str(a)]) == 2
    assert "no name" in _err(capsys)


def test_debug_shows_the_traceback_only_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", "lmc", "--out", str(tmp_path / "o"), "--set", "epochs=abc"]
    assert main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main([*argv, "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_evaluation_restores_each_submodules_mode() -> None:
    from mergelab.merge.soup import greedy_soup

    torch.manual_seed(0)
    models = [build_model("mlp", (1, 8, 8), 10, width=8, depth=1, norm="batchnorm") for _ in range(2)]
    for m in models:
        m.train()
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm1d):
                mod.eval()  # frozen statistics
    data = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))]
    mergelab.evaluation.evaluate(models[0], data)
    soup = greedy_soup(models, data=data)
    for m in [*models, soup]:
        bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm1d)]
        assert bns and not any(bn.training for bn in bns)
    assert models[0].training


@pytest.mark.ray
def test_ray_processes_end_with_a_killed_driver() -> None:
    pytest.importorskip("ray")
    code = (
        "import time\n"
        "from mergelab.experiments.runner import make_executor\n"
        "ex = make_executor('ray', progress=False, num_cpus=1)\n"
        "print('READY', flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": _src()}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        time.sleep(2)  # let the watchdog note Ray's helper agents
        from mergelab.experiments._watchdog import ray_descendants

        ray_pids = list(ray_descendants(proc.pid))
        assert ray_pids
    finally:
        proc.kill()
        proc.wait()
    _wait_gone(ray_pids, timeout=30)
