"""Tiny settings of every zoo architecture, shared by the structure and recovery tests (fast on CPU)."""

from __future__ import annotations

from typing import Any

ZOO_TINY: dict[str, dict[str, Any]] = {
    "mlp": {"width": 8, "depth": 2},
    "cnn": {"width": 4},
    "vgg": {"width": 0.125},
    "resnet": {"depth": 8, "width": 0.25},
    "vit": {"dim": 8, "depth": 2, "heads": 2},
}
