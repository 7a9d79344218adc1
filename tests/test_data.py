"""Properties of mergelab.data: embedded datasets, local readers, class splits, loaders, batch helpers."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from mergelab.data import (
    DATASETS,
    DataSplits,
    MNIST1DConfig,
    batch_inputs,
    batch_xy,
    list_datasets,
    load_dataset,
    make_loader,
    make_mnist1d,
    read_idx,
    split_classes,
)

SMALL = 200  # MNIST-1D samples in tests: 160 train / 40 test


def _assert_splits_equal(a: DataSplits, b: DataSplits) -> None:
    for split in ("train", "test"):
        for ta, tb in zip(getattr(a, split).tensors, getattr(b, split).tensors, strict=True):
            assert torch.equal(ta, tb)


def _assert_well_formed(d: DataSplits, input_shape: tuple[int, ...], num_classes: int) -> None:
    assert d.input_shape == input_shape
    assert d.num_classes == num_classes
    for ds in (d.train, d.test):
        x, y = ds.tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert tuple(x.shape[1:]) == input_shape and y.shape == (x.shape[0],)
        assert torch.isfinite(x).all()
        assert int(y.min()) >= 0 and int(y.max()) < num_classes


# -- registry ------------------------------------------------------------------------------------------------


def test_registry_names() -> None:
    assert {"digits", "mnist1d", "mnist", "cifar10", "cifar100"} <= set(DATASETS)
    assert list_datasets() == sorted(DATASETS)


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="imagenet") as err:
        load_dataset("imagenet")
    assert "digits" in str(err.value) and "mnist1d" in str(err.value)


def test_bad_arguments_name_the_builder_and_argument() -> None:
    with pytest.raises(TypeError, match="sed"):
        load_dataset("digits", sed=1)
    with pytest.raises(TypeError, match="root"):
        load_dataset("mnist")
    with pytest.raises(TypeError, match="root"):
        load_dataset("cifar10")


# -- digits --------------------------------------------------------------------------------------------------


def test_digits_shapes_and_standardisation() -> None:
    d = load_dataset("digits")
    _assert_well_formed(d, (1, 8, 8), 10)
    assert (len(d.train), len(d.test)) == (1347, 450)
    assert d.class_names == tuple(str(i) for i in range(10))
    x = d.train.tensors[0]
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1.0) < 1e-3  # train statistics
    # stratified: every class appears in the test split in proportion
    counts = torch.bincount(d.test.tensors[1], minlength=10)
    assert int(counts.min()) >= 40


def test_digits_deterministic_per_seed() -> None:
    _assert_splits_equal(load_dataset("digits", seed=3), load_dataset("digits", seed=3))
    a, b = load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert not torch.equal(a.train.tensors[1], b.train.tensors[1])


def test_digits_test_fraction() -> None:
    d = load_dataset("digits", test_fraction=0.5)
    assert abs(len(d.test) - len(d.train)) <= 1
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("digits", test_fraction=1.5)


# -- MNIST-1D ------------------------------------------------------------------------------------------------


def test_mnist1d_shapes(tmp_path: Path) -> None:
    d = load_dataset("mnist1d", num_samples=SMALL, cache_dir=tmp_path)
    _assert_well_formed(d, (1, 40), 10)
    assert (len(d.train), len(d.test)) == (160, 40)
    y = torch.cat([d.train.tensors[1], d.test.tensors[1]])
    assert torch.bincount(y, minlength=10).tolist() == [SMALL // 10] * 10  # balanced classes
    x = d.train.tensors[0]
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1.0) < 1e-3


def test_mnist1d_deterministic_per_seed(tmp_path: Path) -> None:
    # separate cache folders: equality must come from the generator, not from reading one file twice
    a = load_dataset("mnist1d", num_samples=SMALL, seed=5, cache_dir=tmp_path / "a")
    b = load_dataset("mnist1d", num_samples=SMALL, seed=5, cache_dir=tmp_path / "b")
    _assert_splits_equal(a, b)
    c = load_dataset("mnist1d", num_samples=SMALL, seed=6, cache_dir=tmp_path / "a")
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])


def test_mnist1d_generator_does_not_touch_global_rng() -> None:
    np.random.seed(0)
    expected = np.random.rand()
    np.random.seed(0)
    make_mnist1d(MNIST1DConfig(num_samples=50))
    assert np.random.rand() == expected


def test_mnist1d_split_sizes_and_variants() -> None:
    arrays = make_mnist1d(MNIST1DConfig(num_samples=105, train_split=0.6, seed=1))
    assert arrays["x_train"].shape == (60, 40) and arrays["x_test"].shape == (40, 40)  # 105 -> 10 per class
    plain = make_mnist1d(MNIST1DConfig(num_samples=50, seed=2))
    shuffled = make_mnist1d(MNIST1DConfig(num_samples=50, seed=2, shuffle_seq=True))
    # shuffle_seq permutes the positions of every sample with one shared permutation
    assert np.allclose(np.sort(plain["x_train"], axis=1), np.sort(shuffled["x_train"], axis=1))
    assert not np.allclose(plain["x_train"], shuffled["x_train"])


@pytest.mark.parametrize(
    "kwargs", [{"num_samples": 5}, {"train_split": 1.0}, {"train_split": 0.0}, {"padding": (5, 2)}]
)
def test_mnist1d_config_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="MNIST1DConfig"):
        MNIST1DConfig(**kwargs)


def test_mnist1d_is_the_package_data_standardised_on_train(tmp_path: Path, monkeypatch) -> None:
    import mnist1d.data
    import requests

    def no_network(*args, **kwargs):
        raise AssertionError("mnist1d tried to download")

    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setattr(mnist1d.data, "get_dataset", no_network)
    args = mnist1d.data.get_dataset_args()
    args.num_samples, args.seed = SMALL, 3
    ref = mnist1d.data.make_dataset(args)  # the authors' generator, standardised over train + test
    d = load_dataset("mnist1d", num_samples=SMALL, seed=3, cache_dir=tmp_path)
    assert torch.equal(d.train.tensors[1], torch.from_numpy(ref["y"]))
    assert torch.equal(d.test.tensors[1], torch.from_numpy(ref["y_test"]))
    # ours = the package's samples up to one affine map (train statistics instead of train + test)
    mean, std = ref["x"].mean(), ref["x"].std()
    expected = torch.from_numpy(((ref["x_test"] - mean) / std).astype(np.float32))
    assert torch.allclose(d.test.tensors[0][:, 0], expected, atol=1e-5)


def test_mnist1d_cache_round_trip(tmp_path: Path) -> None:
    first = load_dataset("mnist1d", num_samples=SMALL, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1
    # a valid cache file is what later calls return: alter its data, keep its key
    with np.load(files[0]) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["x_train"] = arrays["x_train"] + 1.0
    with open(files[0], "wb") as fh:
        np.savez(fh, **arrays)
    again = load_dataset("mnist1d", num_samples=SMALL, cache_dir=tmp_path)
    assert torch.allclose(again.train.tensors[0], first.train.tensors[0] + 1.0)
    # other generation parameters get their own file
    load_dataset("mnist1d", num_samples=SMALL, seed=1, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_shape"])
def test_mnist1d_corrupt_cache_is_rebuilt(tmp_path: Path, damage: str) -> None:
    fresh = load_dataset("mnist1d", num_samples=SMALL, cache_dir=tmp_path / "fresh")
    load_dataset("mnist1d", num_samples=SMALL, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.npz")
    if damage == "garbage":
        path.write_bytes(b"not an npz file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
        arrays["x_test"] = arrays["x_test"][:5]
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)
    rebuilt = load_dataset("mnist1d", num_samples=SMALL, cache_dir=tmp_path)
    _assert_splits_equal(rebuilt, fresh)
    with np.load(path) as f:  # and the file was repaired
        assert f["x_test"].shape == (40, 1, 40)


def test_mnist1d_cache_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "env-cache"))
    load_dataset("mnist1d", num_samples=SMALL)
    assert len(list((tmp_path / "env-cache").glob("mnist1d-*.npz"))) == 1


# -- class splits --------------------------------------------------------------------------------------------


def _toy(n: int = 40, classes: int = 4) -> TensorDataset:
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)  # x identifies the row
    y = torch.arange(n) % classes
    return TensorDataset(x, y)


def test_split_classes_relabels_in_group_order() -> None:
    ds = _toy()
    a, b = split_classes(ds, [[0, 2], range(3, 0, -2)])  # groups {0, 2} and {3, 1}
    assert set(a.tensors[1].tolist()) == {0, 1} and set(b.tensors[1].tolist()) == {0, 1}
    orig = ds.tensors[1]
    for part, group in ((a, [0, 2]), (b, [3, 1])):
        rows = part.tensors[0].squeeze(1).long()
        assert torch.equal(torch.tensor(group)[part.tensors[1]], orig[rows])  # label -> group[label]
        assert torch.all(rows[1:] > rows[:-1])  # original order kept
    assert len(a) + len(b) == len(ds)


def test_split_classes_keeps_labels_without_relabel() -> None:
    (a,) = split_classes(_toy(), [[1, 3]], relabel=False)
    assert set(a.tensors[1].tolist()) == {1, 3}
    assert a.tensors[1].dtype == torch.int64


@pytest.mark.parametrize("groups", [[[0, 1], [1, 2]], [[0, 0]], [[]], [[-1]]])
def test_split_classes_rejects_bad_groups(groups: list) -> None:
    with pytest.raises(ValueError, match="split_classes"):
        split_classes(_toy(), groups)


def test_split_classes_rejects_non_tensor_dataset() -> None:
    with pytest.raises(TypeError, match="TensorDataset"):
        split_classes([(torch.zeros(2), 0)], [[0]])  # type: ignore[arg-type]


def test_datasplits_split_classes() -> None:
    d = load_dataset("digits")
    low, high = d.split_classes([range(5), range(5, 10)])
    assert low.num_classes == high.num_classes == 5
    assert high.class_names == ("5", "6", "7", "8", "9")
    assert high.input_shape == d.input_shape and high.name == "digits[5,6,7,8,9]"
    assert len(low.train) + len(high.train) == len(d.train)
    assert len(low.test) + len(high.test) == len(d.test)
    (kept,) = d.split_classes([[7, 8]], relabel=False)
    assert kept.num_classes == 10 and set(kept.test.tensors[1].tolist()) == {7, 8}
    with pytest.raises(ValueError, match="out of range"):
        d.split_classes([[9, 10]])


def test_datasplits_validates_shapes() -> None:
    ds = TensorDataset(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="input_shape|expected"):
        DataSplits("toy", ds, ds, num_classes=2, input_shape=(1, 4, 4))
    with pytest.raises(ValueError, match="class_names"):
        DataSplits("toy", ds, ds, num_classes=2, input_shape=(1, 8, 8), class_names=("a",))


# -- loaders and batch helpers -------------------------------------------------------------------------------


def _order(loader: torch.utils.data.DataLoader) -> list[int]:
    return [int(v) for x, _ in loader for v in x.squeeze(1)]


def test_make_loader_is_deterministic() -> None:
    ds = _toy(50)
    assert _order(make_loader(ds, batch_size=8)) == list(range(50))
    a = _order(make_loader(ds, batch_size=8, shuffle=True, seed=1))
    b = _order(make_loader(ds, batch_size=8, shuffle=True, seed=1))
    c = _order(make_loader(ds, batch_size=8, shuffle=True, seed=2))
    assert a == b and a != c and sorted(a) == list(range(50))
    torch.manual_seed(123)  # the global RNG plays no part
    assert _order(make_loader(ds, batch_size=8, shuffle=True, seed=1)) == a
    sizes = [len(x) for x, _ in make_loader(ds, batch_size=8)]
    assert sizes == [8] * 6 + [2]
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(ds, batch_size=0)


def test_batch_helpers_accept_x_or_xy() -> None:
    x, y = torch.randn(3, 2), torch.tensor([0, 1, 2])
    for batch in (x, (x,), [x]):
        assert batch_inputs(batch) is x
        assert batch_xy(batch)[1] is None
    for batch in ((x, y), [x, y], (x, y, torch.zeros(3))):
        bx, by = batch_xy(batch)
        assert bx is x and by is y
        assert batch_inputs(batch) is x
    for bad in ((), "x", (np.zeros(3), y), (x, [0, 1, 2])):
        with pytest.raises(TypeError, match="batch_xy"):
            batch_xy(bad)


def test_batch_helpers_on_a_real_loader() -> None:
    loader = make_loader(_toy(10), batch_size=4)
    assert sum(len(batch_inputs(b)) for b in loader) == 10


# -- local readers: MNIST (IDX) ------------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _write_mnist(root: Path, gz: bool = False, n_train: int = 12, n_test: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) * 3) % 10,
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        _write_idx(root / (name + (".gz" if gz else "")), a)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reader(tmp_path: Path, gz: bool) -> None:
    arrays = _write_mnist(tmp_path, gz=gz)
    d = load_dataset("mnist", root=tmp_path)
    _assert_well_formed(d, (1, 28, 28), 10)
    assert torch.equal(d.train.tensors[1], torch.from_numpy(arrays["train-labels-idx1-ubyte"]).long())
    assert torch.equal(d.test.tensors[1], torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    # pixels survive up to the affine standardisation
    raw = arrays["t10k-images-idx3-ubyte"].astype(np.float64)
    got = d.test.tensors[0].squeeze(1).double().numpy()
    assert np.corrcoef(raw.ravel(), got.ravel())[0, 1] > 0.9999
    assert abs(float(d.train.tensors[0].mean())) < 1e-4


def test_mnist_reader_torchvision_layout(tmp_path: Path) -> None:
    _write_mnist(tmp_path / "MNIST" / "raw")
    assert len(load_dataset("mnist", root=tmp_path).train) == 12


def test_read_idx_round_trip_and_errors(tmp_path: Path) -> None:
    a = np.arange(24).reshape(2, 3, 4)
    _write_idx(tmp_path / "ok", a)
    assert np.array_equal(read_idx(tmp_path / "ok"), a)
    (tmp_path / "magic").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "magic")
    (tmp_path / "short").write_bytes((tmp_path / "ok").read_bytes()[:-3])
    with pytest.raises(ValueError, match="short"):
        read_idx(tmp_path / "short")


def test_mnist_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("mnist", root=tmp_path / "nowhere")
    _write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", root=tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"junk")
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", root=tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(5))  # 5 labels for 6 images
    with pytest.raises(ValueError, match="t10k"):
        load_dataset("mnist", root=tmp_path)


# -- local readers: CIFAR (pickles) --------------------------------------------------------------------------


def _cifar_images(n: int, offset: int) -> np.ndarray:
    """(n, 3072) uint8 rows; sample i has the constant value 10*c + i + offset in channel c."""
    values = 10 * np.arange(3)[None, :] + offset + np.arange(n)[:, None]  # (n, 3)
    return np.repeat(values.astype(np.uint8), 1024, axis=1)  # (n, 3 * 1024): R plane, G plane, B plane


def _dump(path: Path, obj: dict, protocol: int = 2) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def _write_cifar10(root: Path, n: int = 2) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):  # bytes keys, as in the original Python-2 pickles
        _dump(root / f"data_batch_{i}", {b"data": _cifar_images(n, 5 * i), b"labels": [i, (i + 5) % 10]})
    _dump(root / "test_batch", {"data": _cifar_images(n, 100), "labels": [3, 4]}, protocol=5)  # str keys
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    _dump(root / "batches.meta", {b"label_names": names})


def test_cifar10_reader(tmp_path: Path) -> None:
    _write_cifar10(tmp_path / "cifar-10-batches-py")
    d = load_dataset("cifar10", root=tmp_path)
    _assert_well_formed(d, (3, 32, 32), 10)
    assert (len(d.train), len(d.test)) == (10, 2)
    assert d.train.tensors[1].tolist() == [1, 6, 2, 7, 3, 8, 4, 9, 5, 0]
    assert d.test.tensors[1].tolist() == [3, 4]
    assert d.class_names is not None and d.class_names[0] == "airplane"
    x = d.train.tensors[0]
    # rows are R, G, B planes: every channel of every image is constant, and standardised per channel
    assert torch.allclose(x.amax(dim=(2, 3)), x.amin(dim=(2, 3)))
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)


def test_cifar10_missing_and_corrupt_batch(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("cifar10", root=tmp_path / "nowhere")
    _write_cifar10(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", root=tmp_path)
    (tmp_path / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="data_batch_3"):
        load_dataset("cifar10", root=tmp_path)
    _dump(tmp_path / "data_batch_3", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ValueError, match="data_batch_3.*3072"):
        load_dataset("cifar10", root=tmp_path)
    _dump(tmp_path / "data_batch_3", {b"labels": [0, 1]})
    with pytest.raises(ValueError, match="data_batch_3.*'data'"):
        load_dataset("cifar10", root=tmp_path)


class _Payload:
    def __reduce__(self) -> tuple:
        return (os.getcwd, ())


def test_cifar_refuses_pickles_that_run_code(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    _dump(tmp_path / "test_batch", {b"data": _Payload(), b"labels": [0]})
    with pytest.raises(ValueError, match="test_batch"):
        load_dataset("cifar10", root=tmp_path)


def _write_cifar100(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    _dump(root / "train", {b"data": _cifar_images(4, 0), b"fine_labels": [0, 99, 42, 7],
                           b"coarse_labels": [0, 19, 3, 2]})  # fmt: skip
    _dump(root / "test", {b"data": _cifar_images(2, 50), b"fine_labels": [5, 6], b"coarse_labels": [1, 1]})
    _dump(root / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                          b"coarse_label_names": [f"c{i}".encode() for i in range(20)]})  # fmt: skip


def test_cifar100_reader(tmp_path: Path) -> None:
    _write_cifar100(tmp_path / "cifar-100-python")
    fine = load_dataset("cifar100", root=tmp_path)
    _assert_well_formed(fine, (3, 32, 32), 100)
    assert fine.train.tensors[1].tolist() == [0, 99, 42, 7]
    assert fine.class_names is not None and fine.class_names[99] == "f99"
    coarse = load_dataset("cifar100", root=tmp_path, label="coarse")
    _assert_well_formed(coarse, (3, 32, 32), 20)
    assert coarse.test.tensors[1].tolist() == [1, 1] and coarse.class_names[19] == "c19"
    with pytest.raises(ValueError, match="label"):
        load_dataset("cifar100", root=tmp_path, label="medium")
    (tmp_path / "cifar-100-python" / "meta").unlink()
    with pytest.raises(FileNotFoundError, match="meta"):
        load_dataset("cifar100", root=tmp_path)
