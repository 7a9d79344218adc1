"""Multi-task metrics, class-embedding heads, the loss-landscape plane, and the ``multitask`` study."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import mergelab
from mergelab.analysis.landscape import endpoint_alignment, loss_plane, plane_coordinates, plot_plane
from mergelab.analysis.tasks import TaskSet, evaluate_multitask, multitask_metrics, normalized_accuracy
from mergelab.data import split_classes
from mergelab.evaluation import evaluate
from mergelab.match.activation_matching import match_activations
from mergelab.merge.partial import ClassEmbeddingModel, build_multihead, class_embeddings
from mergelab.models import build_model
from mergelab.structure import discover_structure
from mergelab.structure.alignment import apply_alignment

SHAPE = (1, 8, 8)


def _mlp(seed: int, classes: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", SHAPE, classes, width=16, depth=2).eval()


def _labelled(n: int = 200, classes: int = 10, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, *SHAPE, generator=gen), torch.randint(0, classes, (n,), generator=gen)
    )


def _batches(ds: TensorDataset, size: int = 64) -> list:
    x, y = ds.tensors
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


# ----------------------------------------------------------------------------------------------- tasks


def test_task_set_layout_and_overlap_errors() -> None:
    t = TaskSet.from_groups([range(3), [7, 5, 6]], names=["low", "high"])
    assert t.sizes == (3, 3) and t.num_outputs == 6 and t.output_classes == (0, 1, 2, 7, 5, 6)
    task, local = t.locate(torch.tensor([0, 5, 7, 2]))
    assert task.tolist() == [0, 1, 1, 0] and local.tolist() == [0, 1, 0, 2]
    with pytest.raises(ValueError, match="class 2 is in task 0 and task 1"):
        TaskSet(((0, 1, 2), (2, 3)))
    with pytest.raises(ValueError, match="twice"):
        TaskSet(((0, 0),))
    with pytest.raises(ValueError, match="label 4 belongs to no task"):
        t.locate(torch.tensor([4]))
    with pytest.raises(ValueError, match="outputs"):
        multitask_metrics(torch.zeros(2, 5), torch.tensor([0, 1]), t)


def test_joint_per_task_and_normalised_accuracy() -> None:
    t = TaskSet(((0, 1), (2, 3)))
    logits = torch.tensor([[5.0, 0, 0, 0], [0, 0, 1, 3], [0, 4, 2, 0], [0, 0, 3, 1]])
    m = multitask_metrics(logits, torch.tensor([0, 3, 2, 2]), t)
    assert m.joint_accuracy == 0.75  # sample 2 is right within task B but loses to task A's logit
    assert m.task_accuracy == (1.0, 1.0) and m.counts == (1, 3)
    assert m.normalized([0.5, 1.0]) == (2.0, 1.0)
    assert normalized_accuracy([0.4], [0.8]) == (0.5,)
    with pytest.raises(ValueError, match="positive"):
        normalized_accuracy([0.4], [0.0])


def test_side_by_side_per_task_accuracy_is_each_models_own_accuracy() -> None:
    a, b = _mlp(0, classes=4), _mlp(1, classes=6)
    groups = [range(4), range(4, 10)]
    ds = _labelled()
    s = discover_structure(a, torch.zeros(2, *SHAPE))
    side = build_multihead([a, b], match_activations(s, [a, _mlp(1, classes=4)], [ds.tensors[0]]), merged=0)
    m = evaluate_multitask(side, _batches(ds), TaskSet.from_groups(groups))
    for model, part, acc in zip((a, b), split_classes(ds, groups), m.task_accuracy, strict=True):
        assert evaluate(model, _batches(part)).accuracy == pytest.approx(acc)


# ----------------------------------------------------------------------------------------------- heads


def test_class_embeddings_are_orthonormal_and_shared() -> None:
    e = class_embeddings(10, 12, seed=3)
    torch.testing.assert_close(e @ e.T, torch.eye(10), atol=1e-5, rtol=0)
    assert torch.equal(e, class_embeddings(10, 12, seed=3))
    with pytest.raises(ValueError, match="dim=4 < num_classes=10"):
        class_embeddings(10, 4)


def test_class_embedding_models_merge_into_one_head() -> None:
    e = class_embeddings(10, 16)
    nets = [_mlp(0, classes=16), _mlp(1, classes=16)]
    a, b = ClassEmbeddingModel(nets[0], e[:5]), ClassEmbeddingModel(nets[1], e[5:])
    x = torch.randn(8, *SHAPE)
    assert a(x).shape == b(x).shape == (8, 5)
    merged_net = mergelab.merge(nets, method="zipit", data=[torch.randn(64, *SHAPE)])
    joint = ClassEmbeddingModel(merged_net, e)  # one model over all ten classes
    assert joint(x).shape == (8, 10)
    itself = ClassEmbeddingModel(mergelab.merge([nets[0], nets[0]], method="average"), e[:5])
    torch.testing.assert_close(itself(x), a(x))


# ----------------------------------------------------------------------------------------------- landscape


def test_plane_coordinates_and_endpoints(tmp_path: Path) -> None:
    nets = [nn.Linear(3, 2) for _ in range(3)]
    sds = [n.state_dict() for n in nets]
    origin, u, v, keys = plane_coordinates(sds)
    assert keys == ["weight", "bias"] and float(u @ v) == pytest.approx(0.0, abs=1e-12)
    x, y = torch.randn(32, 3), torch.randint(0, 2, (32,))

    def losses(m: nn.Module) -> dict[str, float]:
        return {
            "loss": float(nn.functional.cross_entropy(m(x), y)),
            "twice": 2 * float(nn.functional.cross_entropy(m(x), y)),
        }

    mid = {k: (sds[0][k] + sds[1][k]) / 2 for k in sds[0]}
    r = loss_plane(nets[0], {"a": sds[0], "b": sds[1], "c": sds[2]}, losses, marks={"mid": mid}, steps=5)
    dist_ab = float(torch.cat([(sds[1][k] - sds[0][k]).flatten() for k in keys]).norm())
    assert r.points["a"] == (0.0, 0.0) and r.points["b"][0] == pytest.approx(dist_ab) and r.points["c"][1] > 0
    assert r.points["mid"][0] == pytest.approx(dist_ab / 2) and r.distances["mid"] == pytest.approx(
        0.0, abs=1e-6
    )
    assert len(r.grids["loss"]) == 5 and len(r.grids["loss"][0]) == 5
    path = plot_plane(r, tmp_path / "plane.png")
    assert path.exists() and path.stat().st_size > 1000
    with pytest.raises(ValueError, match="collinear"):
        plane_coordinates([sds[0], sds[1], mid])


def test_endpoint_alignment_places_a_model_exactly_in_the_merged_basis() -> None:
    a, b = _mlp(0), _mlp(1)
    s = discover_structure(a, torch.zeros(2, *SHAPE))
    al = match_activations(s, [a, b], [torch.randn(128, *SHAPE)])
    x = torch.randn(10, *SHAPE)
    for i, m in enumerate((a, b)):
        torch.testing.assert_close(
            apply_alignment([a, b], endpoint_alignment(al, i))(x), m(x), atol=1e-5, rtol=1e-5
        )
        point = build_multihead([a, b], endpoint_alignment(al, i))  # both heads on model i's trunk
        torch.testing.assert_close(point.forward_tasks(x)[i], m(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- the study

TINY = ["datasets=[\"digits\"]", "widths=[12]", "depth=2", "epochs=1", "seeds=[0, 1]", "alphas=[0.5]", "max_iter=2",
        "landscape_steps=3", "partial_cuts=[1]", "heads=[\"concat\"]", "zip_grid=[[0.3, 0.125], [0.5, 1.0]]", "deep_depth=5"]  # fmt: skip


def test_multitask_study_runs_end_to_end(tmp_path: Path) -> None:
    from mergelab.experiments import run_study

    report = run_study("multitask", tmp_path / "run", overrides=TINY, progress=False)
    text = report.read_text()
    for method in (
        "ensemble",
        "weight matching",
        "activation matching",
        "zipit (own defaults)",
        "zipit at mudsc knobs (= mudsc α=0)",
        "zipit selected",
        "zipit partial (L=1)",
        "mudsc zip",
        "mudsc zip 1-pass",
    ):
        assert f"| {method} |" in text
    assert text.index("Claims and verdicts") < text.index("concat heads")
    claims = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]["claims"]
    assert len(claims) >= 7 and all(c["interval"]["n"] == 2 for c in claims)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    rows = metrics["metrics"]["results"][0]["rows"]
    ens = next(r for r in rows if r["method"] == "ensemble")
    assert ens["normalized"] == pytest.approx(1.0)
    assert all(0.0 <= r["joint"] <= 1.0 for r in rows)
    assert (tmp_path / "run" / "landscape_digits-w12-concat.png").exists()
    assert (tmp_path / "run" / "alpha_sweep_digits-w12-concat.png").exists()
    # N = 3 models (digits 0–2 / 3–5 / 6–8) merged at once: its own table, claims and sweep, no landscape
    assert "concat heads, 3 tasks" in text and "| task C |" in text.replace(" | task C", "| task C")
    three = [r for r in metrics["metrics"]["results"] if r["tasks"] == 3]
    assert len(three) == 2 and all(0.0 <= row["joint"] <= 1.0 for r in three for row in r["rows"])
    assert any("3 tasks" in c["setting"] for c in claims)
    assert not (tmp_path / "run" / "landscape_digits-w12-concat-3tasks.png").exists()
    # the partial-zipping cut sweep on a deeper net: every cut 1..4, its figure and a claim at ZipIt's ratio
    deep = [r for r in metrics["metrics"]["results"] if r["depth"] == 5]
    assert {row["method"] for row in deep[0]["rows"]} >= {
        "zipit partial (L=3)",
        "zipit partial (L=1)",
        "ensemble",
    }
    assert (tmp_path / "run" / "partial_cuts_digits-w12-concat-depth5.png").exists()
    assert any("ZipIt's 13/20" in c["claim"] for c in claims)


@pytest.mark.slow
def test_multitask_study_both_head_setups_two_seeds(tmp_path: Path) -> None:
    from mergelab.experiments import run_study

    over = [o for o in TINY if not o.startswith(("heads", "seeds", "alphas", "zip_grid"))]
    over += ['heads=["concat", "embedding"]', "seeds=[0, 1]", "alphas=[0.3, 0.7]", "widths=[16]", "epochs=3"]
    report = run_study("multitask", tmp_path / "run", overrides=over, progress=False)
    text = report.read_text()
    assert "embedding heads" in text and "concat heads" in text and "± " in text
    with pytest.raises(ValueError, match="unknown heads"):
        run_study(
            "multitask",
            tmp_path / "bad",
            overrides=[*(o for o in TINY if not o.startswith("heads")), 'heads=["sum"]'],
            progress=False,
        )


@pytest.mark.slow
def test_multitask_vit_preset_matches_attention_heads(tmp_path: Path) -> None:
    """``--preset vit``: the attention-head case (heads matched as groups); partial cuts of the residual stream
    are skipped with a warning, every other method runs."""
    from mergelab.experiments import run_study

    over = ["preset=vit", "widths=[16]", "depth=1", "vit_heads=2", "epochs=2", "seeds=[0, 1]", "alphas=[0.5]",
            "max_iter=2", "zip_grid=[[0.3, 0.125]]"]  # fmt: skip
    run_study("multitask", tmp_path / "run", overrides=over, progress=False)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    methods = {row["method"] for row in metrics["results"][0]["rows"]}
    assert {"mudsc zip", "zipit (own defaults)", "weight matching", "ensemble"} <= methods
    assert all(c["interval"]["n"] == 2 for c in metrics["claims"])
