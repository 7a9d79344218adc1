"""What a shared match context saves: four aligned methods on one pair, each on its own vs on one context.

For two MLPs 3×W on digits (random init: the cost of discovery and statistics does not depend on training), runs
``activation_matching``, ``zipit``, ``mudsc`` (``mode="align"``, three alpha candidates chosen on the training
data) and ``weight_matching`` through ``mergelab.merge`` — once each with ``data=`` (every call discovers the
structure and, for the data-driven ones, streams the statistics again), then all four with ``context=`` one
``match_context`` (one discovery, one statistics pass). Prints wall and CPU seconds of each and checks that both
ways give the same merged weights.

    python benchmarks/shared_context.py [--width 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

import mergelab
from mergelab.data import load_dataset
from mergelab.models import build_model

METHODS: dict[str, dict[str, object]] = {
    "activation_matching": {},
    "zipit": {},
    "mudsc": {"mode": "align", "alphas": (0.2, 0.5, 0.8)},
    "weight_matching": {},
}


def _run(models: list, loader: DataLoader, shared: bool) -> tuple[float, float, dict[str, dict]]:
    wall, cpu = time.perf_counter(), time.process_time()
    ctx = mergelab.match_context(models, loader) if shared else None
    out = {}
    for method, options in METHODS.items():
        if shared:
            m = mergelab.merge(models, method=method, context=ctx, **options)
        else:
            m = mergelab.merge(models, method=method, data=loader, **options)
        out[method] = m.state_dict()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = load_dataset("digits")
    loader = DataLoader(data.train, batch_size=256)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(
            build_model("mlp", data.input_shape, data.num_classes, width=args.width, depth=3).eval()
        )
    _run(models, loader, shared=True)  # warm-up: torch.export's first-call start-up
    rows = {False: [], True: []}
    results = {}
    for _ in range(args.repeats):
        for shared in (False, True):  # interleaved, so load changes hit both alike
            wall, cpu, results[shared] = _run(models, loader, shared)
            rows[shared].append((wall, cpu))
    same = all(
        torch.equal(results[False][m][k], results[True][m][k]) for m in METHODS for k in results[False][m]
    )
    print(f"MLP 3x{args.width} on digits ({len(data.train)} training images), {', '.join(METHODS)}")
    for shared in (False, True):
        wall, cpu = min(rows[shared])
        print(
            f"  {'one shared context' if shared else 'each on its own':20s} wall {wall:6.2f} s  cpu {cpu:6.2f} s"
        )
    print(f"  same merged weights: {same}")


if __name__ == "__main__":
    main()
