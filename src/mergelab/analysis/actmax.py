"""Activation maximisation of hidden units, with an optional decorrelated Fourier parameterisation.

Optimise an input, starting from small noise, so that one unit's activation is as large as possible, with the
usual regularisers — an L2 penalty and a total-variation penalty, random jitter (a circular shift of the input
each step), and optionally a Fourier parameterisation with ``1/f`` scaling (:func:`spectrum_to_image`) so that
Adam's steps favour low frequencies. Works for 1-D (``(C, L)``) and 2-D (``(C, H, W)``) inputs.

Background: Olah et al., "Feature Visualization", Distill 2017 (regularisers, jitter, decorrelated Fourier
parameterisation). Part of :mod:`mergelab.analysis.feature_vis`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mergelab.analysis.units import UnitSelection, unit_activations
from mergelab.evaluation import eval_mode

__all__ = [
    "ActMaxConfig",
    "ActMaxResult",
    "activation_maximization",
    "fourier_scale",
    "image_to_spectrum",
    "spectrum_to_image",
]


# -- Fourier parameterisation --------------------------------------------------------------------------------


def fourier_scale(spatial: Sequence[int], decay: float = 1.0) -> Tensor:
    """Per-frequency scale ``1 / max(|f|, 1/max(spatial))**decay`` on the ``rfftn`` grid, RMS-normalised to 1.

    A spectrum of white noise times this scale is ``1/f`` ("pink") noise: natural-image statistics, so that
    optimising the spectrum favours smooth inputs. The RMS normalisation keeps the image's scale comparable
    with the pixel parameterisation.

    Args:
        spatial: the spatial sizes (``(L,)`` or ``(H, W)``; any number of axes works).
        decay: the exponent (0 = white, 1 = pink).

    Returns:
        A real tensor of shape ``(*spatial[:-1], spatial[-1] // 2 + 1)``.
    """
    if not spatial:
        raise ValueError("fourier_scale: need at least one spatial axis")
    freqs = [torch.fft.fftfreq(n) for n in spatial[:-1]] + [torch.fft.rfftfreq(spatial[-1])]
    grids = torch.meshgrid(*freqs, indexing="ij")
    radius = torch.sqrt(sum(g**2 for g in grids))  # type: ignore[arg-type]
    scale = radius.clamp_min(1.0 / max(spatial)) ** (-float(decay))
    return scale / scale.pow(2).mean().sqrt()


def spectrum_to_image(spectrum: Tensor, spatial: Sequence[int], decay: float = 1.0) -> Tensor:
    """Image from a scaled spectrum: ``irfftn(spectrum * fourier_scale)`` over the trailing spatial axes.

    Args:
        spectrum: complex ``(..., *spatial[:-1], spatial[-1] // 2 + 1)``, or real with a trailing axis of 2
            (real, imaginary) — the form kept as an optimisable parameter.
        spatial: output spatial sizes (needed: ``rfftn`` loses the parity of the last size).
        decay: as in :func:`fourier_scale`.

    Returns:
        The real image ``(..., *spatial)``.
    """
    if not spectrum.is_complex():
        if spectrum.shape[-1] != 2:
            raise ValueError(
                f"spectrum_to_image: real spectrum {tuple(spectrum.shape)} needs a last axis of 2"
            )
        spectrum = torch.view_as_complex(spectrum.contiguous())
    scale = fourier_scale(spatial, decay)
    if tuple(spectrum.shape[-len(spatial) :]) != tuple(scale.shape):
        raise ValueError(
            f"spectrum_to_image: spectrum {tuple(spectrum.shape)} does not fit spatial {tuple(spatial)} "
            f"(expected trailing {tuple(scale.shape)})"
        )
    dims = tuple(range(-len(spatial), 0))
    return torch.fft.irfftn(spectrum * scale, s=tuple(spatial), dim=dims, norm="ortho")


def image_to_spectrum(image: Tensor, spatial_dims: int, decay: float = 1.0) -> Tensor:
    """Inverse of :func:`spectrum_to_image`: the complex scaled spectrum of ``image``'s last ``spatial_dims`` axes.

    Example:
        >>> import torch
        >>> x = torch.randn(2, 1, 7, 6)
        >>> torch.allclose(spectrum_to_image(image_to_spectrum(x, 2), (7, 6)), x, atol=1e-5)
        True
    """
    if not 1 <= spatial_dims <= image.ndim:
        raise ValueError(f"image_to_spectrum: spatial_dims={spatial_dims} for image {tuple(image.shape)}")
    spatial = tuple(image.shape[-spatial_dims:])
    dims = tuple(range(-spatial_dims, 0))
    return torch.fft.rfftn(image, dim=dims, norm="ortho") / fourier_scale(spatial, decay)


# -- activation maximisation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActMaxConfig:
    """Settings of :func:`activation_maximization`.

    Attributes:
        steps: Adam steps (a fixed number; no early stopping, so runs are comparable).
        lr: Adam learning rate on the parameterisation.
        l2: weight of the mean squared input (keeps the input in the data's range; inputs are standardised).
        tv: weight of the total variation (mean absolute difference of neighbours along each spatial axis).
        jitter: largest circular shift (positions) along each spatial axis, drawn anew each step.
        fourier: optimise a ``1/f``-scaled spectrum instead of the pixels.
        decay: exponent of the ``1/f`` scaling.
        init_std: standard deviation of the starting noise (in input units).
        value_range: if given, the image is ``lo + (hi - lo) * sigmoid(z)``: always inside the range.
        seed: seed of the starting noise and the jitter.
    """

    steps: int = 200
    lr: float = 0.05
    l2: float = 0.1
    tv: float = 0.1
    jitter: int = 1
    fourier: bool = True
    decay: float = 1.0
    init_std: float = 0.1
    value_range: tuple[float, float] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if (
            self.steps < 0
            or self.lr <= 0
            or self.l2 < 0
            or self.tv < 0
            or self.jitter < 0
            or self.init_std < 0
        ):
            raise ValueError(
                f"ActMaxConfig: steps, lr, l2, tv, jitter, init_std must be non-negative (lr > 0): {self}"
            )
        if self.value_range is not None and not self.value_range[0] < self.value_range[1]:
            raise ValueError(f"ActMaxConfig: value_range {self.value_range} must be (lo, hi) with lo < hi")


@dataclass
class ActMaxResult:
    """Result of :func:`activation_maximization`.

    Attributes:
        images: the optimised inputs, ``(U, *input_shape)``, one per unit in ``units`` order.
        activations: each unit's activation on its own final image (no jitter), ``(U,)``.
        initial_activations: the same on the starting noise, ``(U,)``.
        history: each unit's (jittered) activation at every step, ``(U, steps)``.
        units: the unit indices.
        module: the module read.
    """

    images: Tensor
    activations: Tensor
    initial_activations: Tensor
    history: Tensor
    units: tuple[int, ...]
    module: str


def _tv(img: Tensor, spatial_dims: int) -> Tensor:
    """Anisotropic total variation per image: mean |neighbour difference|, summed over spatial axes → ``(U,)``."""
    total = img.new_zeros(img.shape[0])
    for d in range(img.ndim - spatial_dims, img.ndim):
        if img.shape[d] > 1:
            total = total + img.diff(dim=d).abs().flatten(1).mean(1)
    return total


def activation_maximization(
    model: nn.Module, selection: UnitSelection, config: ActMaxConfig = ActMaxConfig()
) -> ActMaxResult:
    """Optimise one input per selected unit to maximise that unit's activation (all units in one batch).

    Loss per unit ``u`` with image ``x_u``: ``-a_u(jitter(x_u)) + l2 * mean(x_u**2) + tv * TV(x_u)``. The model
    runs in eval mode and its parameters receive no gradient; nothing about it is changed.

    Args:
        model: the network.
        selection: from :func:`select_units` (gives the module, units and input shape).
        config: the regularisers and optimiser settings; same config (seed) → identical images.

    Returns:
        An :class:`ActMaxResult`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU())
        >>> from mergelab.analysis.units import select_units
        >>> sel = select_units(net, "0", input_shape=(1, 12))
        >>> r = activation_maximization(net, sel, ActMaxConfig(steps=10))
        >>> tuple(r.images.shape), tuple(r.history.shape)
        ((4, 1, 12), (4, 10))
    """
    cfg = config
    shape = selection.input_shape
    spatial = tuple(shape[1:])
    n = len(selection.units)
    if cfg.fourier and not spatial:
        raise ValueError(
            f"activation_maximization: fourier=True needs a spatial axis; input shape is {shape}"
        )
    gen = torch.Generator().manual_seed(int(cfg.seed))
    if cfg.fourier:
        freq_shape = (*spatial[:-1], spatial[-1] // 2 + 1)
        param = cfg.init_std * torch.randn(n, shape[0], *freq_shape, 2, generator=gen)
    else:
        param = cfg.init_std * torch.randn(n, *shape, generator=gen)
    param.requires_grad_(True)

    def to_image(p: Tensor) -> Tensor:
        z = spectrum_to_image(p, spatial, cfg.decay) if cfg.fourier else p  # (U, *shape)
        if cfg.value_range is None:
            return z
        lo, hi = cfg.value_range
        return lo + (hi - lo) * torch.sigmoid(z)

    rows = torch.arange(n)
    spatial_axes = tuple(range(2, 2 + len(spatial)))
    history = torch.zeros(n, cfg.steps)
    opt = torch.optim.Adam([param], lr=cfg.lr)
    with eval_mode(model):
        with torch.no_grad():
            initial = unit_activations(model, selection, to_image(param))[rows, rows].clone()
        for step in range(cfg.steps):
            img = to_image(param)
            x = img
            if cfg.jitter and spatial:
                shifts = torch.randint(-cfg.jitter, cfg.jitter + 1, (len(spatial),), generator=gen).tolist()
                x = torch.roll(img, shifts=shifts, dims=spatial_axes)
            act = unit_activations(model, selection, x)[rows, rows]  # unit u on image u, (U,)
            penalty = cfg.l2 * img.pow(2).flatten(1).mean(1)
            if cfg.tv and spatial:
                penalty = penalty + cfg.tv * _tv(img, len(spatial))
            loss = (penalty - act).sum()
            (grad,) = torch.autograd.grad(loss, [param])  # model parameters get no .grad
            param.grad = grad
            opt.step()
            history[:, step] = act.detach()
        with torch.no_grad():
            images = to_image(param).detach()
            final = unit_activations(model, selection, images)[rows, rows]
    return ActMaxResult(images, final, initial, history, selection.units, selection.module)
