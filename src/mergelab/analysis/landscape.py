"""Loss landscape on the plane through three models — MuDSC's picture of where a merge lands between tasks.

Three *anchors* (state dicts of one architecture: e.g. endpoint A, endpoint B and a merge) span a plane in
parameter space; :func:`loss_plane` evaluates any number of metrics (task A loss, task B loss, their average) on a
grid over that plane, and :func:`plot_plane` draws one contour panel per metric with the anchors and other marked
models (projected onto the plane; their distance from it is reported) as points.

Coordinates are Euclidean in parameter space (floating-point tensors only; integer buffers come from the
template): anchor 0 is the origin, anchor 1 lies on the positive x axis, anchor 2 in the upper half plane.

The models must share one basis. For models of different tasks merged with a multi-head model, express each
endpoint in the merged basis with :func:`~mergelab.merge.aligned.endpoint_alignment` (re-exported here) — exact for a permutation alignment (the endpoint's
function is unchanged), so use a permutation alignment (e.g. activation matching) to place the endpoints and mark
zip merges as further points.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from mergelab.merge.aligned import endpoint_alignment

__all__ = ["PlaneResult", "endpoint_alignment", "loss_plane", "plane_coordinates", "plot_plane"]

logger = logging.getLogger(__name__)

StateDict = Mapping[str, Tensor]


@dataclass(frozen=True)
class PlaneResult:
    """Metric grids on a plane and the coordinates of the marked models.

    Attributes:
        xs, ys: grid coordinates along the plane's two orthonormal directions.
        grids: metric name → values, shape ``(len(ys), len(xs))``.
        points: model name → its (x, y) coordinates (projection onto the plane).
        distances: model name → distance from the plane (0 for the anchors).
    """

    xs: tuple[float, ...]
    ys: tuple[float, ...]
    grids: dict[str, list[list[float]]]
    points: dict[str, tuple[float, float]]
    distances: dict[str, float]

    def to_dict(self) -> dict[str, object]:
        return {
            "xs": list(self.xs),
            "ys": list(self.ys),
            "grids": self.grids,
            "points": {k: list(v) for k, v in self.points.items()},
            "distances": self.distances,
        }


def _float_keys(sd: StateDict) -> list[str]:
    return [k for k, v in sd.items() if v.is_floating_point()]


def _flatten(sd: StateDict, keys: Sequence[str]) -> Tensor:
    return torch.cat([sd[k].detach().double().flatten().cpu() for k in keys])


def plane_coordinates(anchors: Sequence[StateDict]) -> tuple[Tensor, Tensor, Tensor, list[str]]:
    """Origin and orthonormal directions ``(origin, u, v, keys)`` of the plane through three state dicts.

    Raises:
        ValueError: if the state dicts differ in keys or shapes, or the three points are (nearly) collinear.
    """
    if len(anchors) != 3:
        raise ValueError(f"plane_coordinates: need exactly 3 anchors, got {len(anchors)}")
    keys = _float_keys(anchors[0])
    for i, sd in enumerate(anchors[1:], 1):
        for k in keys:
            if k not in sd or sd[k].shape != anchors[0][k].shape:
                got = tuple(sd[k].shape) if k in sd else "missing"
                raise ValueError(
                    f"plane_coordinates: anchor {i} has {k!r} {got} vs {tuple(anchors[0][k].shape)}"
                )
    p0, p1, p2 = (_flatten(sd, keys) for sd in anchors)
    u = p1 - p0
    nu = u.norm()
    if nu == 0:
        raise ValueError("plane_coordinates: anchors 0 and 1 are the same point")
    u = u / nu
    v = (p2 - p0) - ((p2 - p0) @ u) * u
    nv = v.norm()
    if nv <= 1e-6 * max(float(nu), float((p2 - p0).norm())):  # float32 weights: round-off ~1e-7
        raise ValueError("plane_coordinates: the three anchors are collinear; they span no plane")
    return p0, u, v / nv, keys


def _load(model: nn.Module, keys: Sequence[str], flat: Tensor) -> None:
    sd = model.state_dict()
    start = 0
    with torch.no_grad():
        for k in keys:
            t = sd[k]
            n = t.numel()
            t.copy_(flat[start : start + n].view_as(t).to(t.dtype))
            start += n


def loss_plane(
    template: nn.Module,
    anchors: Mapping[str, StateDict],
    evaluate: Callable[[nn.Module], Mapping[str, float]],
    *,
    marks: Mapping[str, StateDict] | None = None,
    steps: int = 17,
    margin: float = 0.3,
) -> PlaneResult:
    """Evaluate metrics on a ``steps × steps`` grid over the plane through three anchor models.

    Args:
        template: a model of the anchors' architecture (copied; loaded with each grid point's weights).
        anchors: three named state dicts spanning the plane (insertion order: origin, x axis, third).
        evaluate: function of a model returning named metrics (e.g. each task's test loss and their mean); it
            is called once per grid point, under ``torch.no_grad``.
        marks: further named state dicts to project onto the plane and mark.
        steps: grid points per axis.
        margin: the grid extends beyond the marked points by this fraction of their span on each side.

    Returns:
        A :class:`PlaneResult`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> nets = [nn.Linear(3, 2) for _ in range(3)]
        >>> x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        >>> loss = lambda m: {"loss": float(nn.functional.cross_entropy(m(x), y))}
        >>> r = loss_plane(nets[0], {n: m.state_dict() for n, m in zip("abc", nets)}, loss, steps=3)
        >>> len(r.grids["loss"]), r.points["a"]
        (3, (0.0, 0.0))
    """
    if steps < 2:
        raise ValueError(f"loss_plane: steps={steps} must be >= 2")
    if len(anchors) != 3:
        raise ValueError(f"loss_plane: need exactly 3 anchors, got {list(anchors)}")
    names = list(anchors)
    origin, u, v, keys = plane_coordinates([anchors[n] for n in names])
    points: dict[str, tuple[float, float]] = {}
    distances: dict[str, float] = {}
    for name, sd in {**anchors, **(marks or {})}.items():
        d = _flatten(sd, keys) - origin
        x, y = float(d @ u), float(d @ v)
        points[name] = (x, y)
        distances[name] = float((d - x * u - y * v).norm())
    px = np.array([p[0] for p in points.values()])
    py = np.array([p[1] for p in points.values()])
    span = max(px.max() - px.min(), py.max() - py.min())
    xs = np.linspace(px.min() - margin * span, px.max() + margin * span, steps)
    ys = np.linspace(py.min() - margin * span, py.max() + margin * span, steps)
    model = copy.deepcopy(template)
    model.eval()
    grids: dict[str, list[list[float]]] = {}
    with torch.no_grad():
        for iy, y in enumerate(ys):
            for ix, x in enumerate(xs):
                _load(model, keys, origin + float(x) * u + float(y) * v)
                for m, value in evaluate(model).items():
                    grids.setdefault(m, [[float("nan")] * steps for _ in range(steps)])[iy][ix] = float(value)
    logger.info("loss_plane: %d × %d grid, points %s", steps, steps, points)
    return PlaneResult(tuple(map(float, xs)), tuple(map(float, ys)), grids, points, distances)


def plot_plane(
    result: PlaneResult, path: str | Path, *, titles: Mapping[str, str] | None = None, quantile: float = 0.9
) -> Path:
    """Contour plots of every metric of ``result`` side by side, with the marked models as labelled points.

    Args:
        result: from :func:`loss_plane`.
        path: the PNG to write.
        titles: metric name → panel title.
        quantile: colour levels span the minimum to this quantile of each grid (high losses far from every model
            would otherwise flatten the interesting region); larger values are drawn in the top colour.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    n = len(result.grids)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.2), squeeze=False)
    xs, ys = np.array(result.xs), np.array(result.ys)
    for ax, (name, grid) in zip(axes[0], result.grids.items(), strict=True):
        z = np.array(grid)
        top = float(np.quantile(z, quantile))
        low = float(z.min())
        levels = np.linspace(low, top if top > low else low + 1e-6, 16)
        cs = ax.contourf(xs, ys, z, levels=levels, cmap="viridis", extend="max")
        ax.contour(xs, ys, z, levels=levels, colors="white", linewidths=0.3, alpha=0.5)
        fig.colorbar(cs, ax=ax, shrink=0.85)
        edge = xs[0] + 0.75 * (xs[-1] - xs[0])
        for label, (px, py) in result.points.items():
            d = result.distances.get(label, 0.0)
            marker = "o" if d < 1e-6 else "x"
            ax.plot(px, py, marker, color="red", markersize=7, markeredgecolor="black")
            right = px > edge  # labels near the right edge go below-left, so they stay inside the panel
            ax.annotate(label, (px, py), textcoords="offset points", xytext=(4, -12) if right else (4, 4),
                        ha="right" if right else "left", fontsize=8, color="white")  # fmt: skip
        ax.set_title((titles or {}).get(name, name))
        ax.set_aspect("equal")
        ax.set_xlabel("direction 1 (parameter space)")
    axes[0][0].set_ylabel("direction 2")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
