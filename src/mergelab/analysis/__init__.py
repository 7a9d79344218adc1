"""Analyses of merged models: linear-mode connectivity (interpolation and barriers), stability, landscapes, ..."""

from mergelab.analysis.interpolate import LMCCurve, barrier, interpolate, interpolate_weights

__all__ = ["LMCCurve", "barrier", "interpolate", "interpolate_weights"]
