"""Evaluation, interpolation curves and barriers."""

from __future__ import annotations

import json

import pytest
import torch
from _align_helpers import CNN, MLP, cnn_structure, loader, mlp_structure, train

from mergelab.analysis import LMCCurve, barrier, interpolate, interpolate_weights
from mergelab.evaluation import evaluate
from mergelab.match import match_weights
from mergelab.merge.aligned import align_to
from mergelab.structure.alignment import to_basis


def _data(n: int = 96, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, y


def test_barrier_definition() -> None:
    assert barrier([0.1, 0.9, 0.3]) == pytest.approx(0.7)
    assert barrier([1.0, 0.5, 0.0]) == 0.0  # on the line
    assert barrier([0.9, 0.5, 0.8], kind="accuracy") == pytest.approx(0.35)
    assert barrier([0.0, 1.0, 0.0, 0.0], lambdas=[0, 0.25, 0.5, 1]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="kind"):
        barrier([0, 1], kind="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lambdas"):
        barrier([0, 1, 2], lambdas=[0, 1])


def test_align_to_then_interpolate_with_max_batches() -> None:
    torch.manual_seed(0)
    x, y = _data()
    a, b = MLP(), MLP()
    s = mlp_structure(a)
    b2 = align_to(a, b, structure=s)
    torch.testing.assert_close(b2(x), b(x), atol=1e-5, rtol=1e-5)
    data = loader(x, y, batch=32)
    curve = interpolate(a, b2, data, steps=3, max_batches=1)
    assert curve.train_loss[0] == pytest.approx(evaluate(a, data[:1]).loss)
    assert curve.train_accuracy[-1] == pytest.approx(evaluate(b, data[:1]).accuracy)


def test_interpolating_a_model_with_itself_is_flat(tmp_path) -> None:
    torch.manual_seed(0)
    x, y = _data()
    model = MLP()
    curve = interpolate(model, model, loader(x, y), steps=5, test_data=loader(*_data(40, 1)))
    assert curve.lambdas == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert max(curve.train_loss) - min(curve.train_loss) < 1e-5
    assert curve.loss_barrier == pytest.approx(0.0, abs=1e-5)
    assert curve.accuracy_barrier == pytest.approx(0.0, abs=1e-9)
    d = curve.to_dict()
    json.dumps(d)
    assert d["test_loss_barrier"] == pytest.approx(0.0, abs=1e-5) and len(d["train_accuracy"]) == 5
    png = curve.plot(tmp_path / "sub" / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curve_endpoints_and_barrier_of_trained_pair() -> None:
    x, y = _data(256)
    data = loader(x, y, batch=128)
    torch.manual_seed(0)
    a = train(MLP(hidden=(32, 32)), x, y, steps=150)
    torch.manual_seed(1)
    b = train(MLP(hidden=(32, 32)), x, y, steps=150)
    curve = interpolate(a, b, data, steps=3)
    assert curve.train_loss[0] == pytest.approx(evaluate(a, data).loss)
    assert curve.train_accuracy[-1] == pytest.approx(evaluate(b, data).accuracy)
    assert curve.test_loss is None and curve.test_loss_barrier is None
    assert curve.loss_barrier == pytest.approx(barrier(curve.train_loss))
    s = mlp_structure(a)
    aligned = interpolate(a, to_basis(b, s, match_weights(s, a, b).perms[1]), data, steps=3)
    assert aligned.loss_barrier < curve.loss_barrier
    repaired = interpolate(a, to_basis(b, s, match_weights(s, a, b).perms[1]), data, steps=3, repair="repair")
    assert repaired.repair == "repair" and repaired.train_loss[0] == aligned.train_loss[0]


def test_interpolation_with_batchnorm_reset() -> None:
    torch.manual_seed(0)
    a, b = CNN(), CNN()
    x = torch.randn(48, 1, 8, 8)
    y = torch.randint(0, 3, (48,))
    data = loader(x, y, batch=24)
    s = cnn_structure(a)
    b = to_basis(b, s, match_weights(s, a, b).perms[1])
    curve = interpolate(a, b, data, steps=3, repair="reset")
    mid = interpolate_weights(a, b, 0.5)
    assert isinstance(curve, LMCCurve) and curve.repair == "reset"
    assert all(torch.isfinite(torch.tensor(curve.train_loss)))
    assert mid.bn1.num_batches_tracked.dtype == torch.long
    with pytest.raises(ValueError, match="steps"):
        interpolate(a, b, data, steps=1)
    with pytest.raises(ValueError, match="repair"):
        interpolate(a, b, data, repair="fix")  # type: ignore[arg-type]
