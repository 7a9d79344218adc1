"""Shared test settings."""

from __future__ import annotations

import os

import torch

# Tiny models on 2 cores: intra-op threads only contend with each other (a 40 ms conv becomes 1 ms).
torch.set_num_threads(1)

# Study jobs run in the test process: worker processes would each import torch and sklearn again, which costs
# more than the tiny jobs themselves (tests that exercise the worker pool pass --workers / workers= explicitly).
os.environ.setdefault("MERGELAB_WORKERS", "1")
