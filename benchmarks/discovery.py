"""Structure discovery on real architectures: time, groups, coverage and what is kept fixed.

Builds tiny Hugging Face transformers configs (random init, nothing downloaded) and mergelab's zoo models,
discovers each from its ``torch.export`` graph and prints one row per model: seconds to discover (export +
propagation, median of ``--repeats`` after one warm-up export; wall and CPU), groups, the coverage of hidden entries and the fixed unit sets.

    python benchmarks/discovery.py [--verbose]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from mergelab.models import build_model
from mergelab.structure import discover_structure


def _hf() -> list[tuple[str, Callable[[], nn.Module], dict]]:
    import transformers as tf

    tf.logging.set_verbosity_error()
    ids = torch.randint(0, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    return [
        (
            "gpt2 (GPT2LMHeadModel, 2 layers, 64 wide, 4 heads)",
            lambda: tf.GPT2LMHeadModel(
                tf.GPT2Config(vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=4, use_cache=False)
            ),
            {"input_ids": ids},
        ),
        (
            "bert (BertForSequenceClassification, 2 layers, 64 wide, 4 heads)",
            lambda: tf.BertForSequenceClassification(
                tf.BertConfig(
                    vocab_size=100,
                    hidden_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    intermediate_size=128,
                    max_position_embeddings=32,
                )
            ),
            {"input_ids": ids, "attention_mask": mask},
        ),
        (
            "llama (LlamaForCausalLM, 2 layers, 64 wide, 4 heads, 2 kv heads)",
            lambda: tf.LlamaForCausalLM(
                tf.LlamaConfig(
                    vocab_size=100,
                    hidden_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    intermediate_size=128,
                    max_position_embeddings=32,
                    use_cache=False,
                )
            ),
            {"input_ids": ids},
        ),
        (
            "t5 encoder (T5EncoderModel, 2 layers, 64 wide, 4 heads)",
            lambda: tf.T5EncoderModel(
                tf.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
            ),
            {"input_ids": ids},
        ),
        (
            "vit (ViTForImageClassification, 2 layers, 64 wide, 4 heads, 32x32)",
            lambda: tf.ViTForImageClassification(
                tf.ViTConfig(
                    image_size=32,
                    patch_size=8,
                    hidden_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    intermediate_size=128,
                )
            ),
            {"pixel_values": torch.randn(2, 3, 32, 32)},
        ),
    ]


def _zoo() -> list[tuple[str, Callable[[], nn.Module], object]]:
    out: list[tuple[str, Callable[[], nn.Module], object]] = []
    for name, shape in (
        ("mlp", (1, 8, 8)),
        ("cnn", (3, 32, 32)),
        ("resnet", (3, 32, 32)),
        ("vit", (3, 32, 32)),
    ):
        out.append(
            (f"zoo {name} {shape}", lambda n=name, s=shape: build_model(n, s, 10), torch.zeros(2, *shape))
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--verbose", action="store_true", help="print each structure's explain()")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rows = []
    models = _hf() + _zoo()
    warm = build_model("mlp", (1, 8, 8), 10)
    discover_structure(warm, torch.zeros(2, 1, 8, 8))  # the first export pays torch.export's own start-up
    for name, make, inputs in models:
        model = make().eval()
        times, cpu = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            s = discover_structure(model, inputs)  # type: ignore[arg-type]
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        fixed = [f for f in s.fixed if f.hidden]
        heads = sorted({g.blocks for g in s if g.blocks > 1})
        rows.append(
            (name, statistics.median(times), statistics.median(cpu), len(s), s.coverage(), len(fixed), heads)
        )
        if args.verbose:
            print(s.explain())
    # wall time on a shared machine includes waiting for a core; CPU time is what discovery itself costs
    print(
        f"{'model':68s} {'wall s':>6s} {'cpu s':>5s} {'groups':>6s} {'coverage':>8s} {'fixed':>5s}  head blocks"
    )
    for name, t, c, n, cov, nf, heads in rows:
        print(f"{name:68s} {t:6.2f} {c:5.2f} {n:6d} {cov:8.1%} {nf:5d}  {heads}")


if __name__ == "__main__":
    main()
