"""Linear-mode connectivity: loss and accuracy along the straight line between two models' weights.

The *barrier* is the largest gap between the curve and the straight line joining its endpoint values (Frankle
et al. 2020; Entezari et al. 2022; Ainsworth et al. 2023): for the loss ``max_λ [L(λ) − ((1−λ)L(0) + λL(1))]``,
for the accuracy ``max_λ [((1−λ)A(0) + λA(1)) − A(λ)]``. Both are ≥ 0, since the endpoints lie on the line.
Align model ``b`` to ``a`` first (e.g. ``to_basis(b, structure, alignment.perms[1])``) to measure the barrier
modulo permutations.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from mergelab.evaluation import batches, evaluate
from mergelab.merge.repair import repair as repair_stats
from mergelab.merge.repair import reset_batchnorm
from mergelab.merge.soup import interpolate_weights
from mergelab.structure.checks import check_same_architecture

__all__ = ["LMCCurve", "barrier", "interpolate", "interpolate_weights"]

logger = logging.getLogger(__name__)


def barrier(
    values: Sequence[float],
    lambdas: Sequence[float] | None = None,
    kind: Literal["loss", "accuracy"] = "loss",
) -> float:
    """Largest gap between a curve and the line through its endpoints (see the module docstring).

    Args:
        values: the metric at each λ, λ increasing from 0 to 1.
        lambdas: the λ values (default: evenly spaced on [0, 1]).
        kind: ``"loss"`` (curve above the line is bad) or ``"accuracy"`` (curve below the line is bad).

    Example:
        >>> barrier([0.1, 0.9, 0.3])
        0.7
    """
    v = torch.as_tensor(list(values), dtype=torch.float64)
    if v.numel() < 2:
        raise ValueError(f"barrier: need at least 2 values, got {v.numel()}")
    lam = (
        torch.linspace(0, 1, v.numel(), dtype=torch.float64)
        if lambdas is None
        else torch.as_tensor(list(lambdas), dtype=torch.float64)
    )
    if lam.numel() != v.numel():
        raise ValueError(f"barrier: {v.numel()} values for {lam.numel()} lambdas")
    line = (1 - lam) * v[0] + lam * v[-1]
    if kind == "loss":
        gap = v - line
    elif kind == "accuracy":
        gap = line - v
    else:
        raise ValueError(f"barrier: kind={kind!r}; choose 'loss' or 'accuracy'")
    return round(float(gap.max()), 12)


@dataclass(frozen=True)
class LMCCurve:
    """Train (and optionally test) loss/accuracy along the interpolation path.

    Attributes:
        lambdas: interpolation weights of model ``b`` (0 = model ``a``).
        train_loss, train_accuracy: metrics on the ``data`` loader.
        test_loss, test_accuracy: metrics on ``test_data`` (``None`` when not given).
        repair: the statistics correction applied at interior points (``None``, ``"reset"``, ``"repair"``).
    """

    lambdas: tuple[float, ...]
    train_loss: tuple[float, ...]
    train_accuracy: tuple[float, ...]
    test_loss: tuple[float, ...] | None = None
    test_accuracy: tuple[float, ...] | None = None
    repair: str | None = None

    @property
    def loss_barrier(self) -> float:
        """Train-loss barrier."""
        return barrier(self.train_loss, self.lambdas, "loss")

    @property
    def accuracy_barrier(self) -> float:
        """Train-accuracy barrier."""
        return barrier(self.train_accuracy, self.lambdas, "accuracy")

    @property
    def test_loss_barrier(self) -> float | None:
        return None if self.test_loss is None else barrier(self.test_loss, self.lambdas, "loss")

    @property
    def test_accuracy_barrier(self) -> float | None:
        return None if self.test_accuracy is None else barrier(self.test_accuracy, self.lambdas, "accuracy")

    def to_dict(self) -> dict:
        """JSON-able dict of the curve and its barriers."""
        d = asdict(self)
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
        d.update(
            loss_barrier=self.loss_barrier,
            accuracy_barrier=self.accuracy_barrier,
            test_loss_barrier=self.test_loss_barrier,
            test_accuracy_barrier=self.test_accuracy_barrier,
        )
        return d

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Write a PNG with loss and accuracy against λ (matplotlib, Agg backend)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        try:
            for ax, (name, train, test) in zip(
                axes,
                [
                    ("loss", self.train_loss, self.test_loss),
                    ("accuracy", self.train_accuracy, self.test_accuracy),
                ],
                strict=True,
            ):
                ax.plot(self.lambdas, train, marker="o", label="train")
                if test is not None:
                    ax.plot(self.lambdas, test, marker="s", label="test")
                ax.set_xlabel("λ (weight of model b)")
                ax.set_ylabel(name)
                ax.grid(alpha=0.3)
                ax.legend()
            fig.suptitle(
                title or f"interpolation (loss barrier {self.loss_barrier:.3g}, repair={self.repair})"
            )
            fig.tight_layout()
            fig.savefig(path, dpi=100)
        finally:
            plt.close(fig)
        return path


def interpolate(
    a: nn.Module,
    b: nn.Module,
    data: Iterable,
    *,
    steps: int = 11,
    test_data: Iterable | None = None,
    repair: Literal["reset", "repair"] | None = None,
    max_batches: int | None = None,
) -> LMCCurve:
    """Evaluate the models on the straight line between ``a`` and ``b`` in weight space.

    Args:
        a, b: two models of one architecture (align ``b`` to ``a`` first to study connectivity modulo
            permutations).
        data: batches ``(x, y)``: the curve's "train" metrics, and the statistics for ``repair``. ``y`` may hold
            one target per position (``(N, T)``, e.g. a language model's next tokens): the loss is then the mean
            per-token cross-entropy, whose ``exp`` is the perplexity (see :mod:`mergelab.evaluation`).
        steps: number of evenly spaced λ in [0, 1] (≥ 2).
        test_data: optional second loader for "test" metrics.
        repair: correct interior points with ``"reset"`` (BatchNorm statistics) or ``"repair"`` (REPAIR towards
            ``(1−λ)·stats(a) + λ·stats(b)``); the endpoints are evaluated as they are.
        max_batches: limit on batches per evaluation / statistics pass.

    Returns:
        An :class:`LMCCurve`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
        >>> curve = interpolate(nn.Linear(4, 3), nn.Linear(4, 3), data, steps=3)
        >>> len(curve.lambdas)
        3
    """
    if steps < 2:
        raise ValueError(f"interpolate: steps must be >= 2, got {steps}")
    if repair not in (None, "reset", "repair"):
        raise ValueError(f"interpolate: repair={repair!r}; choose None, 'reset' or 'repair'")
    check_same_architecture([a, b], "interpolate")
    lambdas = [i / (steps - 1) for i in range(steps)]
    tr_l, tr_a, te_l, te_a = [], [], [], []
    for lam in lambdas:
        m = interpolate_weights(a, b, lam)
        if 0 < lam < 1:
            if repair == "reset":
                m = reset_batchnorm(m, data, max_batches=max_batches)
            elif repair == "repair":
                m = repair_stats(m, [a, b], data, [1 - lam, lam], max_batches=max_batches)
        met = evaluate(m, batches(data, max_batches=max_batches))
        tr_l.append(met.loss)
        tr_a.append(met.accuracy)
        if test_data is not None:
            met = evaluate(m, batches(test_data, max_batches=max_batches))
            te_l.append(met.loss)
            te_a.append(met.accuracy)
        logger.debug("interpolate: λ=%.3f train loss %.4f acc %.4f", lam, tr_l[-1], tr_a[-1])
    curve = LMCCurve(
        tuple(lambdas),
        tuple(tr_l),
        tuple(tr_a),
        tuple(te_l) if test_data is not None else None,
        tuple(te_a) if test_data is not None else None,
        repair,
    )
    logger.info(
        "interpolate: loss barrier %.4f, accuracy barrier %.4f", curve.loss_barrier, curve.accuracy_barrier
    )
    return curve
