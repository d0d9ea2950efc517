"""The fast partitioning path of ``fedeq.data.partition`` gives exactly the partitions of the original path.

The original path (kept below as ``reference_partition_indices``, the code of ``fedeq/data.py`` before the
fast path) loads every partition with Flower Datasets' ``load_partition`` and, for Dirichlet, lets
``DirichletPartitioner`` run all its resampling attempts before it falls back to ``min_partition_size=0``
plus a top-up. Runs' results depend on these partitions, so they must not change.
"""

from __future__ import annotations

import heapq
import warnings

import datasets
import numpy as np
import pytest
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

from fedeq.data import partition_indices
from fedeq.data.partition import dirichlet, flower

# --------------------------------------------------------------------------------------------------------
# The original implementation (fedeq/data.py before the fast path), kept verbatim in substance
# --------------------------------------------------------------------------------------------------------


def _ref_run_partitioner(
    partitioner: Partitioner, order: np.ndarray, partition_labels: np.ndarray
) -> list[np.ndarray]:
    partitioner.dataset = datasets.Dataset.from_dict(
        {"label": partition_labels, "index": order.astype(np.int64)}
    )
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for pid in range(partitioner.num_partitions):
            part = partitioner.load_partition(pid).with_format("numpy")
            out.append(np.sort(np.asarray(part["index"], dtype=np.int64)))
    return out


def _dirichlet_partitioner(num_partitions: int, alpha: float, seed: int, min_size: int) -> Partitioner:
    """Flower's Dirichlet partitioner as fedeq configures it."""
    return DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=alpha,
        min_partition_size=min_size,
        self_balancing=False,
        shuffle=False,
        seed=seed,
    )


def _ref_dirichlet(
    order: np.ndarray,
    partition_labels: np.ndarray,
    num_partitions: int,
    alpha: float,
    seed: int,
    min_size: int,
) -> list[np.ndarray]:
    def make(min_partition_size: int) -> DirichletPartitioner:
        return _dirichlet_partitioner(num_partitions, alpha, seed, min_partition_size)

    try:
        return _ref_run_partitioner(make(min_size), order, partition_labels)
    except ValueError as exc:
        if "max number of attempts" not in str(exc):
            raise
    parts = [list(p) for p in _ref_run_partitioner(make(0), order, partition_labels)]
    rng = np.random.default_rng([seed, 1])
    heap = [(-len(p), j) for j, p in enumerate(parts)]
    heapq.heapify(heap)
    for pid in range(num_partitions):
        while len(parts[pid]) < min_size:
            neg_size, donor = heapq.heappop(heap)
            if -neg_size != len(parts[donor]):
                continue
            taken = parts[donor].pop(int(rng.integers(len(parts[donor]))))
            parts[pid].append(taken)
            heapq.heappush(heap, (-len(parts[donor]), donor))
            heapq.heappush(heap, (-len(parts[pid]), pid))
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def reference_partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    scheme: str,
    alpha: float = 0.5,
    labels_per_client: int = 2,
    seed: int = 0,
    min_partition_size: int = 2,
) -> list[np.ndarray]:
    labels = np.asarray(labels).reshape(-1)
    n = int(labels.shape[0])
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    partition_labels = labels[order]
    if scheme == "iid":
        partitioner: Partitioner = IidPartitioner(num_partitions=num_partitions)
    elif scheme == "dirichlet":
        min_size = max(0, int(min_partition_size))
        return _ref_dirichlet(order, partition_labels, num_partitions, float(alpha), seed, min_size)
    else:
        classes = np.unique(labels)
        relabel = rng.permutation(classes.size)
        partition_labels = relabel[np.searchsorted(classes, partition_labels)]
        partitioner = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=int(labels_per_client),
            class_assignment_mode="first-deterministic",
            shuffle=False,
            seed=seed,
        )
    return _ref_run_partitioner(partitioner, order, partition_labels)


# --------------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------------


def _labels(n: int, num_classes: int, skewed: bool, seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if skewed:  # class c is about (c + 1) times as frequent as class 0
        weights = np.arange(1, num_classes + 1, dtype=float)
        return rng.choice(num_classes, size=n, p=weights / weights.sum()).astype(np.int64)
    return rng.integers(0, num_classes, n).astype(np.int64)


def _assert_same(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for pid, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == np.int64, pid
        np.testing.assert_array_equal(g, w, err_msg=f"partition {pid}")


@pytest.mark.parametrize("num_partitions", [1, 2, 7, 13, 64, 200])
@pytest.mark.parametrize("seed", [0, 3])
def test_iid_identical(num_partitions: int, seed: int) -> None:
    labels = _labels(200, 5, skewed=False)
    _assert_same(
        partition_indices(labels, num_partitions, "iid", seed=seed),
        reference_partition_indices(labels, num_partitions, "iid", seed=seed),
    )


DIRICHLET_CASES = [
    # (num_partitions, alpha, min_partition_size): the first attempt that fits varies with the seed,
    # from 0 through later attempts (up to the last, 10) to none (fallback and top-up)
    (10, 0.5, 2),
    (10, 0.5, 8),
    (20, 0.3, 3),
    (12, 0.7, 8),
    (40, 0.5, 2),
    (10, 0.5, 0),
    (25, 5.0, 4),
    (8, 0.05, 1),  # alpha < 0.1: NumPy's other Dirichlet sampler
]


@pytest.mark.parametrize("case", DIRICHLET_CASES)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("skewed", [False, True])
def test_dirichlet_identical(case: tuple[int, float, int], seed: int, skewed: bool) -> None:
    num_partitions, alpha, min_size = case
    labels = _labels(200, 5, skewed=skewed)
    kwargs = {"alpha": alpha, "seed": seed, "min_partition_size": min_size}
    _assert_same(
        partition_indices(labels, num_partitions, "dirichlet", **kwargs),
        reference_partition_indices(labels, num_partitions, "dirichlet", **kwargs),
    )


def _flower_failed_attempts(
    partition_labels: np.ndarray, num_partitions: int, alpha: float, seed: int, min_size: int
) -> int | None:
    """How many attempts ``DirichletPartitioner`` itself needs before one fits (None: it gives up)."""
    partitioner = _dirichlet_partitioner(num_partitions, alpha, seed, min_size)
    partitioner.dataset = datasets.Dataset.from_dict({"label": partition_labels})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            partitioner.load_partition(0)
        except ValueError as exc:
            assert "max number of attempts" in str(exc)
            return None
    return sum("min_partition_size" in str(w.message) for w in caught)


def test_dirichlet_replay_predicts_flower_attempts() -> None:
    """The size-only replay finds the same fitting attempt as the partitioner, and the cases cover
    a first-attempt fit, later fits (the last attempt included) and giving up."""
    seen: set[int | None] = set()
    for skewed in (False, True):
        labels = _labels(200, 5, skewed=skewed)
        for num_partitions, alpha, min_size in DIRICHLET_CASES:
            for seed in range(4):
                order = np.random.default_rng(seed).permutation(labels.shape[0])
                partition_labels = labels[order]
                fit, first_sizes = dirichlet.dirichlet_first_fit(
                    partition_labels, num_partitions, alpha, seed, min_size
                )
                assert fit == _flower_failed_attempts(partition_labels, num_partitions, alpha, seed, min_size)
                seen.add(fit)
                zero = DirichletPartitioner(
                    num_partitions=num_partitions,
                    partition_by="label",
                    alpha=alpha,
                    min_partition_size=0,
                    self_balancing=False,
                    shuffle=False,
                    seed=seed,
                )
                zero.dataset = datasets.Dataset.from_dict({"label": partition_labels})
                sizes = [len(zero.load_partition(pid)) for pid in range(num_partitions)]
                np.testing.assert_array_equal(first_sizes, sizes)
    assert {0, 10, None} <= seen
    assert any(isinstance(f, int) and 0 < f < 10 for f in seen)


@pytest.mark.parametrize("num_partitions,k", [(1, 1), (3, 1), (5, 2), (10, 2), (25, 3), (40, 2), (7, 5)])
@pytest.mark.parametrize("seed", [0, 4])
@pytest.mark.parametrize("skewed", [False, True])
def test_shards_identical(num_partitions: int, k: int, seed: int, skewed: bool) -> None:
    labels = _labels(200, 5, skewed=skewed)
    kwargs = {"labels_per_client": k, "seed": seed}
    _assert_same(
        partition_indices(labels, num_partitions, "shards", **kwargs),
        reference_partition_indices(labels, num_partitions, "shards", **kwargs),
    )


def test_non_contiguous_labels_identical() -> None:
    """Class labels with gaps (as an npz may have) go through every scheme unchanged."""
    labels = np.array([0, 3, 7, 9])[_labels(150, 4, skewed=True)]
    for scheme, num_partitions in (("iid", 11), ("dirichlet", 30), ("shards", 9)):
        _assert_same(
            partition_indices(labels, num_partitions, scheme, seed=2),
            reference_partition_indices(labels, num_partitions, scheme, seed=2),
        )


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_slow_fallback_identical(monkeypatch: pytest.MonkeyPatch, scheme: str) -> None:
    """Where the partitioner's computed partitions cannot be read, loading each one gives the same."""
    monkeypatch.setattr(flower, "computed_partitions", lambda partitioner, order: None)
    labels = _labels(200, 5, skewed=True)
    _assert_same(
        partition_indices(labels, 30, scheme, seed=1),
        reference_partition_indices(labels, 30, scheme, seed=1),
    )


def test_fast_path_mismatch_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the partitions read at once disagree with ``load_partition``, the slow path is used."""
    real = flower.computed_partitions

    def shifted(partitioner: Partitioner, order: np.ndarray) -> list[np.ndarray] | None:
        parts = real(partitioner, order)
        return None if parts is None else parts[1:] + parts[:1]

    monkeypatch.setattr(flower, "computed_partitions", shifted)
    labels = _labels(200, 5, skewed=False)
    _assert_same(
        partition_indices(labels, 9, "iid", seed=0), reference_partition_indices(labels, 9, "iid", seed=0)
    )


def test_dirichlet_replay_mismatch_keeps_flower_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the replayed sizes of attempt 0 were not the partitioner's, the original path runs instead
    (here the replay wrongly says that no attempt fits, and its sizes are off by one)."""
    real = dirichlet.dirichlet_first_fit

    def wrong(*args: object) -> tuple[int | None, np.ndarray]:
        fit, sizes = real(*args)  # type: ignore[arg-type]
        return None, sizes + 1

    monkeypatch.setattr(dirichlet, "dirichlet_first_fit", wrong)
    labels = _labels(200, 5, skewed=False)
    for num_partitions, alpha, min_size in ((10, 0.5, 2), (20, 0.3, 3)):
        kwargs = {"alpha": alpha, "seed": 1, "min_partition_size": min_size}
        _assert_same(
            partition_indices(labels, num_partitions, "dirichlet", **kwargs),
            reference_partition_indices(labels, num_partitions, "dirichlet", **kwargs),
        )


@pytest.mark.parametrize("scheme", ["dirichlet", "shards"])
def test_flower_private_partition_rows_are_read_where_load_partition_finds_them(scheme: str) -> None:
    """``flower.computed_partitions`` reads ``_partition_id_to_indices`` of Flower Datasets' Dirichlet and
    pathological partitioners (pinned releases, see its docstring). This fails if a release drops the
    attribute, or if its rows stop being the rows ``load_partition`` selects: then the fast path would
    silently turn into the slow one (or, were the probes to agree by chance, give other partitions)."""
    labels = _labels(200, 5, skewed=True)
    order = np.random.default_rng(1).permutation(labels.shape[0])
    if scheme == "dirichlet":
        partitioner = _dirichlet_partitioner(12, 0.5, 1, 2)
    else:
        partitioner = PathologicalPartitioner(
            num_partitions=12,
            partition_by="label",
            num_classes_per_partition=2,
            class_assignment_mode="first-deterministic",
            shuffle=False,
            seed=1,
        )
    partitioner.dataset = datasets.Dataset.from_dict({"label": labels[order], "index": order})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loaded = [flower.loaded_partition(partitioner, pid) for pid in range(12)]
    assert partitioner._partition_id_to_indices_determined is True
    rows = partitioner._partition_id_to_indices
    assert isinstance(rows, dict) and sorted(rows) == list(range(12))
    for pid in range(12):  # row numbers of the dataset handed to the partitioner, as ``select`` takes them
        np.testing.assert_array_equal(np.sort(order[np.asarray(rows[pid], dtype=np.int64)]), loaded[pid])
    fast = flower.computed_partitions(partitioner, order)
    assert fast is not None
    _assert_same(fast, loaded)
