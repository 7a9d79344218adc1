"""Shared test settings."""

from __future__ import annotations

import torch

# Tiny models on 2 cores: intra-op threads only contend with each other (a 40 ms conv becomes 1 ms).
torch.set_num_threads(1)
