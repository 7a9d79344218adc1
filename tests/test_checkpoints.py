"""Checkpoint sources, the sharded writer and streamed merges: exact, checked before writing, loadable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mergelab.cli import main
from mergelab.io import CheckpointError, load, save
from mergelab.io.sources import open_checkpoint
from mergelab.io.writer import ShardedWriter, TensorPlan, parse_size
from mergelab.merge import merge
from mergelab.merge.streamed import merge_checkpoints
from mergelab.models import build_model


def _zoo(seed: int, arch: str = "mlp") -> nn.Module:
    torch.manual_seed(seed)
    kwargs = {"mlp": {"width": 16, "depth": 2, "norm": "batchnorm"}, "cnn": {"width": 4, "depth": 2}}[arch]
    model = build_model(arch, (1, 8, 8), 3, **kwargs)
    model.train()
    model(torch.randn(8, 1, 8, 8))  # non-trivial BatchNorm statistics
    return model.eval()


def _fine_tune(base: nn.Module, seed: int) -> nn.Module:
    import copy

    g = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(base)
    with torch.no_grad():
        for p in model.parameters():
            # task vectors whose scale differs by layer, so a global trim differs from a per-tensor one
            p.add_(torch.randn(p.shape, generator=g) * (0.01 if p.dim() == 1 else 0.1))
        for name, b in model.named_buffers():
            if "running" in name:
                b.add_(torch.rand(b.shape, generator=g))
    return model


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------------------------------------ sources
def test_every_source_form_reads_the_same_tensors(tmp_path: Path) -> None:
    model = _zoo(0)
    run = save(model, tmp_path / "run")
    sd = model.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    plan = [TensorPlan(k, v.dtype, tuple(v.shape)) for k, v in sd.items()]
    (tmp_path / "sharded").mkdir()
    w = ShardedWriter(tmp_path / "sharded", plan, max_shard_size=600)
    for k, v in sd.items():
        w.write(k, v)
    assert len(w.close()) > 2
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    for path, kind in [
        (run, "mergelab"),
        (tmp_path / "w.safetensors", "file"),
        (tmp_path / "sharded", "huggingface"),
    ]:
        with open_checkpoint(path) as src:
            assert src.kind == kind and set(src.keys()) == set(sd)
            for k in sd:
                assert torch.equal(src.read(k), sd[k]), (path, k)
    for f in (tmp_path / "sharded").glob("*.safetensors"):  # the writer's files are plain safetensors
        for k, v in load_file(f).items():
            assert torch.equal(v, sd[k])


def test_pickle_and_broken_sources_are_refused(tmp_path: Path) -> None:
    (tmp_path / "hf").mkdir()
    torch.save({"w": torch.ones(2)}, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        open_checkpoint(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="pickle"):
        open_checkpoint(tmp_path / "hf" / "pytorch_model.bin")
    save_file({"w": torch.ones(4)}, str(tmp_path / "a.safetensors"))
    raw = bytearray((tmp_path / "a.safetensors").read_bytes())
    (tmp_path / "cut.safetensors").write_bytes(bytes(raw[:-4]))  # truncated payload
    with pytest.raises(CheckpointError, match="'w'.*does not fit"):
        open_checkpoint(tmp_path / "cut.safetensors")
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="shard .* is missing"):
        open_checkpoint(tmp_path / "idx")


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(100) == 100
    with pytest.raises(ValueError, match="size"):
        parse_size("lots")


# --------------------------------------------------------------------------------------- checked loading
def test_load_verifies_checksum_refuses_non_finite_and_honours_the_path(tmp_path: Path) -> None:
    a, b = _zoo(0), _zoo(1)
    path = save(a, tmp_path / "c")
    assert "sha256" in json.loads((path / "config.json").read_text())["weights"]["model.safetensors"]
    # a path to a specific weights file loads exactly that file
    save_file({k: v.contiguous() for k, v in b.state_dict().items()}, str(path / "other.safetensors"))
    _assert_same_state(load(path / "other.safetensors"), b)
    _assert_same_state(load(path / "model.safetensors"), a)
    # a flipped payload byte is caught by the checksum
    raw = bytearray((path / "model.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256"):
        load(path)
    bad = _zoo(2)
    with torch.no_grad():
        bad.head.weight[0, 0] = float("nan")
    p2 = save(bad, tmp_path / "nan")
    with pytest.raises(CheckpointError, match="'head.weight' has non-finite"):
        load(p2)


# -------------------------------------------------------------------------------- streamed == in memory
@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("average", {"coefficients": [0.2, 0.3, 0.5]}),
        ("task_arithmetic", {"scaling": 0.7}),
        ("ties", {"density": 0.3}),
        ("ties", {"density": 0.3, "trim": "global"}),
        ("dare", {"drop_rate": 0.4, "sign_election": True, "seed": 3}),
    ],
    ids=["average", "task_arithmetic", "ties", "ties-global", "dare-ties"],
)
def test_streamed_merge_is_bit_identical_to_in_memory(method: str, options: dict, tmp_path: Path) -> None:
    base = _zoo(0)
    tunes = [_fine_tune(base, s) for s in (1, 2, 3)]
    paths = [save(m, tmp_path / f"ft{i}") for i, m in enumerate(tunes)]
    kw = {"base": base} if method != "average" else {}
    expected = merge(tunes, method=method, **kw, **options)
    base_path = save(base, tmp_path / "base") if method != "average" else None
    out = merge_checkpoints(
        paths, tmp_path / "out", method=method, base=base_path, max_shard_size=1000, **options
    )
    assert len(list(out.glob("model-*.safetensors"))) > 1
    _assert_same_state(load(out), expected)


def test_streamed_weight_matching_is_bit_identical_to_in_memory(tmp_path: Path) -> None:
    a, b = _zoo(0, "cnn"), _zoo(1, "cnn")
    expected = merge([a, b], method="weight_matching", example_input=torch.zeros(2, 1, 8, 8))
    out = merge_checkpoints(
        [
            save(a, tmp_path / "a"),
            save(b, tmp_path / "b"),
        ],
        tmp_path / "wm",
        method="weight_matching",
    )
    _assert_same_state(load(out), expected)


def test_inputs_are_checked_before_anything_is_written(tmp_path: Path) -> None:
    a = _zoo(0)
    other = build_model("mlp", (1, 8, 8), 3, width=12, depth=2, norm="batchnorm")
    pa, po = save(a, tmp_path / "a"), save(other, tmp_path / "o")
    with pytest.raises(
        ValueError, match=r"tensor 'head\.weight' is float32\[3, 12\] in .*o but float32\[3, 16\]"
    ):
        merge_checkpoints([pa, po], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    half = {k: v.half() if v.is_floating_point() else v for k, v in a.state_dict().items()}
    save_file(half, str(tmp_path / "h.safetensors"))
    with pytest.raises(ValueError, match="float16"):
        merge_checkpoints([pa / "model.safetensors", tmp_path / "h.safetensors"], tmp_path / "out")
    bad = _zoo(1)
    with torch.no_grad():
        bad.head.bias[1] = float("inf")
    save_file({k: v.contiguous() for k, v in bad.state_dict().items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="bad.safetensors: tensor 'head.bias' has non-finite"):
        merge_checkpoints([pa, tmp_path / "bad.safetensors"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="needs a base"):
        merge_checkpoints([pa, pa], tmp_path / "out", method="ties")
    with pytest.raises(ValueError, match="overlaps the input"):
        merge_checkpoints([pa, pa / "model.safetensors"], pa, force=True)
    assert (pa / "model.safetensors").is_file()
    with pytest.raises(TypeError, match="alpha"):
        merge_checkpoints([pa, pa], tmp_path / "out", method="average", alpha=1)


def test_cli_merges_two_safetensors_files_exactly(tmp_path: Path) -> None:
    a, b = _zoo(0), _zoo(1)
    for name, m in (("a", a), ("b", b)):
        save_file(
            {k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / f"{name}.safetensors")
        )
    rc = main([
        "merge", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
        "--method", "average", "--out", str(tmp_path / "avg"), "-q",
    ])  # fmt: skip
    assert rc == 0
    got = load_file(tmp_path / "avg" / "model.safetensors")
    for k, v in a.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(got[k], 0.5 * v + 0.5 * b.state_dict()[k]), k
    assert json.loads((tmp_path / "avg" / "mergelab.json").read_text())["merge"]["method"] == "average"


# ------------------------------------------------------------------------------------ TIES as the paper
def _paper_ties(base: dict, tunes: list[dict], density: float, lam: float = 1.0) -> dict:
    """TIES as written in the paper's code: top-k over each model's whole flattened task vector (keep entries at
    least the (d - int(d*K))-th smallest magnitude), elect the sign of the sum (zeros: the majority sign),
    mean over the entries that agree, add λ times it to the base."""
    keys = sorted(base)
    flat = torch.stack([torch.cat([(t[k] - base[k]).flatten() for k in keys]) for t in tunes])  # (N, d)
    n, d = flat.shape
    kth = flat.abs().kthvalue(d - int(d * density), dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    sel = trimmed * keep
    merged = sel.sum(dim=0) / (sel != 0).sum(dim=0).float().clamp(min=1)
    out, i = {}, 0
    for k in keys:
        m = base[k].numel()
        out[k] = base[k] + lam * merged[i : i + m].view_as(base[k])
        i += m
    return out


@pytest.mark.parametrize("density", [0.13, 0.37, 0.66])
def test_global_ties_is_the_papers_algorithm(density: float) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))
    tunes = [_fine_tune(base, s) for s in (1, 2, 3)]
    params = lambda m: {k: v.detach().clone() for k, v in m.named_parameters()}  # noqa: E731
    d = sum(p.numel() for p in base.parameters())
    assert d * density % 1 != 0  # then ceil(d·k) = int(d·k) + 1, the paper's count
    expected = _paper_ties(params(base), [params(t) for t in tunes], density, lam=0.8)
    got = params(merge(tunes, method="ties", base=base, density=density, trim="global", scaling=0.8))
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6, msg=k)
    per_tensor = params(merge(tunes, method="ties", base=base, density=density, scaling=0.8))
    assert any(not torch.allclose(per_tensor[k], expected[k]) for k in expected)  # layers differ in scale


def test_per_tensor_ties_is_the_papers_algorithm_on_each_tensor() -> None:
    torch.manual_seed(1)
    base = nn.Linear(9, 1, bias=False)  # one tensor: per tensor == global
    tunes = [_fine_tune(base, s) for s in (4, 5)]
    params = lambda m: {k: v.detach().clone() for k, v in m.named_parameters()}  # noqa: E731
    expected = _paper_ties(params(base), [params(t) for t in tunes], 0.3)
    got = params(merge(tunes, method="ties", base=base, density=0.3))
    torch.testing.assert_close(got["weight"], expected["weight"], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------- Hugging Face folders
@pytest.fixture(scope="module")
def gpt2_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, type]:
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16)
    for seed in (0, 1):
        torch.manual_seed(seed)
        transformers.GPT2LMHeadModel(cfg).save_pretrained(root / f"g{seed}", max_shard_size="40KB")
    return root / "g0", root / "g1", transformers.GPT2LMHeadModel


def test_cli_merges_sharded_hf_folders_into_a_loadable_model(gpt2_folders: tuple, tmp_path: Path) -> None:
    g0, g1, cls = gpt2_folders
    assert (g0 / "model.safetensors.index.json").is_file()
    out = tmp_path / "avg"
    rc = main(
        [
            "merge",
            str(g0),
            str(g1),
            "--method",
            "average",
            "--out",
            str(out),
            "--max-shard-size",
            "30KB",
            "-q",
        ]
    )
    assert rc == 0
    assert (out / "model.safetensors.index.json").is_file() and (out / "generation_config.json").is_file()
    m0, m1 = cls.from_pretrained(g0), cls.from_pretrained(g1)
    merged = cls.from_pretrained(out)
    s0, s1 = m0.state_dict(), m1.state_dict()
    for k, v in merged.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(v, 0.5 * s0[k] + 0.5 * s1[k]), k
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(merged(ids).logits).all()
    with open_checkpoint(out) as src:
        src.verify_checksums()  # recorded in mergelab.json


def test_cli_weight_matching_on_hf_folders_undoes_a_hidden_permutation(
    gpt2_folders: tuple, tmp_path: Path
) -> None:
    from mergelab.structure import discover_structure, permute
    from mergelab.structure.transform import random_permutations

    g0, _, cls = gpt2_folders
    model = cls.from_pretrained(g0).eval()
    model.config.use_cache = False
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    structure = discover_structure(model, {"input_ids": ids})
    permuted = permute(model, structure, random_permutations(structure, 0))
    permuted.save_pretrained(tmp_path / "perm")
    with torch.no_grad():
        assert torch.allclose(permuted(ids).logits, model(ids).logits, atol=1e-5)
    out = tmp_path / "wm"
    assert (
        main(
            ["merge", str(g0), str(tmp_path / "perm"), "--method", "weight_matching", "--out", str(out), "-q"]
        )
        == 0
    )
    merged = cls.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_trim_rounding_rule_and_ties_at_the_threshold() -> None:
    from mergelab.merge.task_vectors import TaskVectorConfig, combine_task_vectors, keep_count

    assert [keep_count(0.2, 10), keep_count(0.25, 10), keep_count(0.01, 10), keep_count(1.0, 7)] == [
        2,
        3,
        1,
        7,
    ]
    d = torch.tensor(
        [[4.0, -3.0, 3.0, 1.0, 0.5]]
    )  # keep ceil(0.4·5) = 2: 4 and both 3s (a tie at the threshold)
    out = combine_task_vectors(d.clone(), TaskVectorConfig(density=0.4))
    assert torch.equal(out, torch.tensor([4.0, -3.0, 3.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="trim"):
        TaskVectorConfig(density=0.5, trim="layer")
    with pytest.raises(ValueError, match="thresholds"):
        combine_task_vectors(d.clone(), TaskVectorConfig(density=0.4, trim="global"))


def test_cli_activation_matching_streams_and_evaluates(tmp_path: Path) -> None:
    torch.manual_seed(0)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(save(build_model("mlp", (1, 8, 8), 10, width=16, depth=1), tmp_path / f"m{seed}"))
    out = tmp_path / "am"
    argv = [
        "merge",
        *map(str, paths),
        "--method",
        "activation_matching",
        "--data",
        "digits",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["metadata"]["merge"]["method"] == "activation_matching"
    assert set(cfg["metadata"]["metrics"]) == {"model0", "model1", "merged"}
    assert load(out).head.weight.shape == (10, 16)


def test_kth_largest_is_exact() -> None:
    from mergelab.merge.task_vectors import kth_largest

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 200_000, generator=g).abs() * torch.logspace(-4, 1, 200_000)
    x[1, :50_000] = 0.0  # zeros and a tie-heavy row
    x[2] = x[2].round(decimals=2)
    for k in (1, 7, 40_000, 150_000, 200_000):
        expected = x.kthvalue(x.shape[1] - k + 1, dim=1).values
        assert torch.equal(kth_largest(x, k), expected), k
        assert torch.equal(kth_largest(x.double(), k), expected.double()), k
