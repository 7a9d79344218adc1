"""Studies run locally and on a real local Ray cluster with the same results."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mergelab.experiments.runner import Executor, build_config, make_executor
from mergelab.report import Report, markdown_table, mean_std


@dataclass(frozen=True)
class _Cfg:
    seeds: tuple[int, ...] = (0, 1)
    name: str = "x"
    lr: float = 0.1


def _square(x: int) -> int:
    return x * x


def test_config_overrides_are_typed_and_checked(tmp_path: Path) -> None:
    cfg = build_config(_Cfg, None, ["seeds=[3, 4, 5]", "name=hello", "lr=0.5"])
    assert cfg == _Cfg(seeds=(3, 4, 5), name="hello", lr=0.5)
    f = tmp_path / "c.json"
    f.write_text('{"lr": 2.0}')
    assert build_config(_Cfg, f, ["name=y"]) == _Cfg(lr=2.0, name="y")
    with pytest.raises(ValueError, match="unknown option"):
        build_config(_Cfg, None, ["epochs=3"])
    with pytest.raises(ValueError, match="key=value"):
        build_config(_Cfg, None, ["epochs"])


def test_local_executor_keeps_order() -> None:
    assert Executor(progress=False, workers=1).map(_square, [3, 1, 2]) == [9, 1, 4]


@pytest.mark.ray
def test_ray_executor_trains_like_the_local_one() -> None:
    pytest.importorskip("ray")
    from mergelab.experiments.demo import train_member

    jobs = [
        dict(dataset="digits", arch="mlp", model_kwargs={"width": 8, "depth": 1}, epochs=1, lr=1e-3, seed=s)
        for s in (0, 1)
    ]
    ex = make_executor("ray", progress=False, num_cpus=2)
    try:
        remote = ex.map(train_member, jobs)
    finally:
        ex.close()
    local = Executor(progress=False, workers=1).map(train_member, jobs)
    for r, l in zip(remote, local, strict=True):
        assert r["seed"] == l["seed"]
        for k in l["state_dict"]:
            assert torch.equal(r["state_dict"][k], l["state_dict"][k]), k


def test_report_writes_markdown_and_json(tmp_path: Path) -> None:
    r = Report(tmp_path, "t", config={"a": 1})
    r.heading("h")
    r.table([{"m": "x", "acc": mean_std([0.5, 0.7])}])
    path = r.save()
    text = path.read_text()
    assert "0.6000 ± 0.1414" in text and (tmp_path / "metrics.json").is_file()
    assert markdown_table([]) == "_(no rows)_\n"


def test_demo_findings_are_read_off_the_numbers() -> None:
    from mergelab.experiments.demo import _barrier_finding, _merge_finding

    assert "does not lower" in _barrier_finding({"naive": 0.2, "weight_matching": 0.3})
    assert "lowers it to 0.050 (25% of naive)" in _barrier_finding({"naive": 0.2, "weight_matching": 0.05})
    rows = [
        {"model": "seed 0", "test accuracy": 0.97},
        {"model": "seed 1", "test accuracy": 0.98},
        {"model": "merge: average", "test accuracy": 0.90},
        {"model": "merge: zipit", "test accuracy": 0.85},
    ]
    text = _merge_finding(rows)
    assert "best merge, zipit, reaches 0.850 (not above plain averaging, more than one point" in text
