"""The studies' one training job: typed, keyed by value, and saving a checkpoint the next run reuses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from mergelab.experiments._jobcache import JobCache
from mergelab.experiments._training import DataSpec, ModelSpec, TrainJob, run_train_job
from mergelab.train import TrainConfig


def _job(tmp_path: Path, **kw: object) -> TrainJob:
    base = TrainJob(
        name="digits-mlp/seed-0",
        data=DataSpec("digits", holdout=0.1, holdout_seed=3),
        model=ModelSpec("mlp", {"width": 8, "depth": 1}),
        train=TrainConfig(epochs=1, batch_size=64, progress=False),
        init_seed=0,
        evaluate=True,
        device="cpu",
    )
    return dataclasses.replace(base, **kw).at(tmp_path)  # type: ignore[arg-type]


def test_train_job_saves_a_checkpoint_that_the_next_run_reuses(tmp_path: Path) -> None:
    job = _job(tmp_path)
    result = run_train_job(job)
    weights = job.checkpoint / "model.safetensors"
    assert weights.is_file() and result.checkpoint == "models/digits-mlp/seed-0"
    assert result.test_accuracy is not None and result.heldout_accuracy is not None
    stamp = weights.stat().st_mtime_ns
    assert job.run() == result and weights.stat().st_mtime_ns == stamp  # found, not retrained
    x = torch.randn(5, 1, 8, 8)
    a, b = job.load(), _job(tmp_path).load()
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    # another seed is another model: it does not pick up this checkpoint
    other = _job(tmp_path, init_seed=1)
    assert other.fingerprint() != job.fingerprint() and other._saved_result() is None


def test_train_job_identity_ignores_where_it_writes(tmp_path: Path) -> None:
    a, b = _job(tmp_path / "x"), _job(tmp_path / "y")
    assert a.fingerprint() == b.fingerprint()
    cache = JobCache(tmp_path / "jobs")
    assert cache.key(run_train_job, a) == cache.key(run_train_job, b)
    assert cache.key(run_train_job, a) != cache.key(
        run_train_job, _job(tmp_path, train=TrainConfig(epochs=2))
    )


def test_fine_tuning_job_starts_from_its_upstream_checkpoint(tmp_path: Path) -> None:
    pre = _job(tmp_path, name="pre", data=DataSpec("digits", classes=(0, 1, 2), relabel=False))
    tuned = _job(
        tmp_path, name="tuned", init=pre, head_seed=5, train=TrainConfig(epochs=1, lr=1e-9, progress=False)
    )
    tuned.run()
    a, b = pre.load(), tuned.load()
    assert pre.checkpoint.is_dir()
    torch.testing.assert_close(
        a.layers[0].weight, b.layers[0].weight, rtol=0, atol=1e-6
    )  # lr ≈ 0: backbone kept
    assert not torch.allclose(a.head.weight, b.head.weight)  # a fresh head
