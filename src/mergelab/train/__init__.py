"""Training: a deterministic supervised loop with callbacks (late-phase weights and SWA plug in here)."""

from mergelab.train.trainer import BaseCallback, Callback, History, TrainConfig, TrainState, train

__all__ = ["BaseCallback", "Callback", "History", "TrainConfig", "TrainState", "train"]
