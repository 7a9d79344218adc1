"""How long zipping takes: a ResNet-20×4 pair (and an MLP 3×512 pair) on digits, 2 CPU threads.

ZipIt! reports ~1 s on a GPU for ResNet-20×4; the goal here is "seconds, not minutes" on 2 CPU cores. Weights are
freshly initialised (timing does not depend on training); statistics use ``--batches`` batches of 256.

    python benchmarks/zip_speed.py [--batches 4]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

from mergelab.data import load_dataset
from mergelab.merge.registry import merge
from mergelab.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = load_dataset("digits")
    loader = DataLoader(data.train, batch_size=256)
    cases = [("resnet", {"depth": 20, "width": 4, "norm": "batchnorm"}), ("mlp", {"width": 512, "depth": 3})]
    print(f"{'model':24s} {'method':10s} {'seconds':>8s}")
    for arch, kw in cases:
        models = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            models.append(build_model(arch, data.input_shape, data.num_classes, **kw).eval())
        for method, opts in (("zipit", {}), ("mudsc", {"alpha": 0.5})):
            t0 = time.perf_counter()
            merge(models, method=method, data=loader, max_batches=args.batches, **opts)
            secs = time.perf_counter() - t0
            name = f"{arch} " + ",".join(f"{k}={v}" for k, v in kw.items())
            print(f"{name:24s} {method:10s} {secs:8.2f}", flush=True)


if __name__ == "__main__":
    main()
