"""The byte-level stdlib corpus: next-byte targets, a deterministic file order, and a split by file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergelab.data.text import VOCAB_SIZE, load_stdlib_corpus, stdlib_files


def _fake_stdlib(root: Path, n: int = 24) -> dict[str, int]:
    """``n`` files, each filled with its own byte value, so every byte names the file it came from."""
    owner = {}
    for i in range(n):
        rel = f"pkg{i % 3}/mod{i}.py"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(bytes([65 + i]) * 300)
        owner[rel] = 65 + i
    (root / "site-packages" / "thirdparty").mkdir(parents=True)
    (root / "site-packages" / "thirdparty" / "x.py").write_bytes(b"!" * 300)
    (root / "notes.txt").write_bytes(b"?" * 300)
    return owner


def _bytes_of(ds: torch.utils.data.TensorDataset) -> set[int]:
    x, y = ds.tensors
    return set(torch.cat([x.flatten(), y.flatten()]).tolist())


def test_blocks_are_next_byte_pairs_over_the_real_stdlib() -> None:
    c = load_stdlib_corpus(block_size=32, max_train_bytes=20_000, max_val_bytes=4_000)
    x, y = c.train.tensors
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape and x.shape[1] == 32
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x[1:, 0], y[:-1, -1])  # consecutive blocks continue the byte stream
    assert int(x.max()) < VOCAB_SIZE and c.vocab_size == VOCAB_SIZE
    assert c.meta["python_version"] and len(c.meta["stdlib_file_list_sha256"]) == 64
    assert c.meta["train_bytes"] == 20_000 and c.meta["train_blocks"] == len(c.train)


def test_split_is_by_file_and_skips_third_party(tmp_path: Path) -> None:
    owner = _fake_stdlib(tmp_path)
    c = load_stdlib_corpus(
        root=tmp_path, block_size=16, max_train_bytes=10_000, max_val_bytes=10_000, val_fraction=0.3
    )
    train, val = _bytes_of(c.train), _bytes_of(c.val)
    assert train and val and not train & val  # no file contributes to both splits
    assert train | val <= set(owner.values())  # site-packages ('!') and non-.py files ('?') are not read
    assert c.meta["train_files"] + c.meta["val_files"] == len(owner) == c.meta["stdlib_py_files"]


def test_file_order_is_deterministic_and_stable_under_additions(tmp_path: Path) -> None:
    _fake_stdlib(tmp_path)
    before = stdlib_files(tmp_path)
    (tmp_path / "pkg9").mkdir()
    (tmp_path / "pkg9" / "new.py").write_bytes(b"x = 1\n")
    after = stdlib_files(tmp_path)
    assert [r for r in after if r != "pkg9/new.py"] == before
    assert before != sorted(before) or len(before) < 3  # hashed, not alphabetical


def test_cache_dir_round_trips(tmp_path: Path) -> None:
    _fake_stdlib(tmp_path / "lib")
    kw = dict(
        root=tmp_path / "lib", block_size=8, max_train_bytes=2_000, max_val_bytes=2_000, val_fraction=0.3
    )
    first = load_stdlib_corpus(cache_dir=tmp_path / "cache", **kw)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    from mergelab.data.text import _load_cached

    _load_cached.cache_clear()
    second = load_stdlib_corpus(cache_dir=tmp_path / "cache", **kw)
    assert first is not second and torch.equal(first.train.tensors[0], second.train.tensors[0])
    assert first.meta == second.meta


def test_bad_settings_name_the_problem(tmp_path: Path) -> None:
    _fake_stdlib(tmp_path)
    with pytest.raises(ValueError, match="block_size"):
        load_stdlib_corpus(root=tmp_path, block_size=0)
    with pytest.raises(ValueError, match="val_fraction"):
        load_stdlib_corpus(root=tmp_path, val_fraction=1.5)
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.py").write_bytes(b"a" * 500)
    with pytest.raises(ValueError, match="split has 0 bytes"):  # one file: one of the splits is empty
        load_stdlib_corpus(root=one, block_size=16)
    with pytest.raises(FileNotFoundError, match="no .py files"):
        stdlib_files(_empty(tmp_path))


def _empty(tmp_path: Path) -> Path:
    d = tmp_path / "empty"
    d.mkdir()
    return d
