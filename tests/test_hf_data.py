"""Your own data: Hugging Face sources (image folder, parquet, CSV, saved dataset), natural and other
Flower Datasets partitions, the checks before any work, and dataset plug-ins (docs/custom_data.md).

Every source is made here, offline. Federated runs are marked slow (each starts a Ray cluster once).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import fedeq
from fedeq.cli.main import main
from fedeq.config import ConfigError, load_config
from fedeq.data import check_data, client_partitions, load_dataset, partition_indices, register_dataset
from fedeq.registry import DATASETS, PARTITIONERS
from tests.doc_blocks import fenced_blocks, run_doc

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "simulations" / "configs" / "quick.yaml"
WRITER_COUNTS = {"w0": 30, "w1": 18, "w2": 42, "w3": 24}
"""Training examples per writer of the saved dataset (distinct, so partition sizes identify writers)."""


def _image(label: int, rng: np.random.Generator) -> np.ndarray:
    """An 8x8 RGB image whose bright row is ``2 * label`` (learnable), with noise."""
    img = rng.integers(0, 60, size=(8, 8, 3), dtype=np.uint8)
    img[2 * label, :, label] = 250
    return img


def _tabular(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    table = pd.DataFrame(rng.normal(size=(n, 4)) + 2.0 * y[:, None], columns=["f0", "f1", "f2", "f3"])
    table["label"] = y
    table["site"] = np.where(y == 0, "north", "south")  # text: never an input
    return table


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    from PIL import Image

    root = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)
    images = root / "images"
    for split, per_class in (("train", 24), ("test", 6)):
        for label in range(3):
            folder = images / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(_image(label, rng)).save(folder / f"{i}.png")

    parquet = root / "table.parquet"
    _tabular(160, 1).to_parquet(parquet)
    csv = root / "table.csv"
    table = _tabular(160, 2).rename(columns={"label": "species"})
    table.to_csv(csv, index=False)

    import datasets

    def writers(counts: dict[str, int], seed: int) -> datasets.Dataset:
        r = np.random.default_rng(seed)
        ids = [w for w, c in counts.items() for _ in range(c)]
        y = r.integers(0, 3, size=len(ids))
        x = r.normal(size=(len(ids), 1, 4, 4)).astype(np.float32) + y[:, None, None, None]
        return datasets.Dataset.from_dict({"pixel_values": x, "label": y, "writer": ids})

    saved = root / "saved"
    train = writers(WRITER_COUNTS, 3)
    test = writers({w: 5 for w in WRITER_COUNTS}, 4)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(saved))
    return SimpleNamespace(root=root, images=images, parquet=parquet, csv=csv, saved=saved, table=table)


# ---------------------------------------- loading


def test_image_folder_is_channels_first_in_unit_range_with_its_own_test_split(sources) -> None:
    data = load_dataset("hf", source=str(sources.images))
    assert data.x_train.shape == (72, 3, 8, 8) and data.x_test.shape == (18, 3, 8, 8)
    assert data.x_train.dtype == np.float32 and 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    assert data.num_classes == 3 and np.bincount(data.y_test).tolist() == [6, 6, 6]
    # each image keeps its label: the bright row 2k in channel k is the label k
    bright = data.x_train.mean(axis=3).reshape(len(data.y_train), -1).argmax(axis=1)
    assert np.array_equal(bright, data.y_train * 8 + 2 * data.y_train)


def test_parquet_uses_every_numeric_column_but_the_label(sources) -> None:
    data = load_dataset("hf", source=str(sources.parquet), test_fraction=0.25)
    assert data.x_train.shape == (120, 1, 1, 4) and data.x_test.shape == (40, 1, 1, 4)
    table = _tabular(160, 1)
    rows = {tuple(np.round(r, 4)) for r in table[["f0", "f1", "f2", "f3"]].to_numpy(np.float32)}
    assert all(tuple(np.round(r, 4)) in rows for r in data.x_train.reshape(120, 4))


def test_csv_with_named_label_and_input_columns(sources) -> None:
    data = load_dataset("hf", source=str(sources.csv), label_key="species", input_key=["f0", "f2"])
    assert data.input_shape == (1, 1, 2) and data.num_classes == 3
    assert len(data.y_train) + len(data.y_test) == 160


def test_natural_partition_gives_one_client_per_writer(sources) -> None:
    cfg = load_config(
        QUICK,
        ["data.name=hf", f"data.source={sources.saved}", "data.partition=natural"]
        + ["data.partition_by=writer", "num_clients=4", "train.batch_size=8"],
    )
    splits = check_data(cfg).splits
    assert splits.x_test.shape == (20, 1, 4, 4)  # the saved test split, not a carved one
    parts = client_partitions(cfg.data, 4, cfg.seed)
    writers = splits.columns["writer"]
    assert [len(set(writers[p])) for p in parts] == [1, 1, 1, 1]
    assert [int(p.shape[0]) for p in parts] == list(WRITER_COUNTS.values())  # sorted ids w0..w3


@pytest.mark.parametrize(
    "scheme, options",
    [("pathological", {"class_assignment": "deterministic"}), ("shard", {"num_shards_per_partition": 2})]
    + [("linear", {}), ("square", {}), ("exponential", {})],
)
def test_named_flower_partitioners(scheme: str, options: dict) -> None:
    labels = load_dataset("digits").y_train
    num = 6 if scheme == "exponential" else 10  # e^1 / sum(e^1..e^10) of 1437 examples is 0
    parts = partition_indices(labels, num, scheme, labels_per_client=2, seed=1, **options)
    used = np.concatenate(parts)
    assert len(parts) == num and len(set(used.tolist())) == len(used)  # disjoint
    sizes = [len(p) for p in parts]
    if scheme == "shard":  # equal shards; the incomplete last shard is left out
        assert len(set(sizes)) == 1 and len(used) > len(labels) - 2 * sizes[0] // 2
        assert all(len(set(labels[p])) <= 4 for p in parts)
        return
    assert sorted(used.tolist()) == list(range(len(labels)))
    if scheme == "pathological":
        assert all(len(set(labels[p])) == 2 for p in parts)
    else:
        assert sizes == sorted(sizes) and sizes[-1] > 2 * sizes[0]


def test_register_dataset_is_public_and_registers(tmp_path) -> None:
    assert fedeq.register_dataset is register_dataset

    @register_dataset("test_ramp")
    class Ramp(fedeq.data.DatasetSource):  # type: ignore[name-defined]
        def load(self, path, test_path):
            y = np.arange(40) % 2
            return fedeq.data.LabelledImages(np.zeros((40, 1, 1, 3), np.float32) + y[:, None, None, None], y)

    try:
        assert DATASETS.get("test_ramp") is Ramp
        assert load_dataset("test_ramp").input_shape == (1, 1, 3)
    finally:
        DATASETS.unregister("test_ramp")
    assert "natural" in PARTITIONERS and "hf" in DATASETS


# ---------------------------------------- checks before any work


def _write_npz(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return str(path)


def _bad_sources(sources, tmp: Path) -> list[tuple[list[str], str, str]]:
    nan_csv = tmp / "nan.csv"
    table = _tabular(40, 5)
    table.loc[3, "f1"] = np.nan
    table.to_csv(nan_csv, index=False)
    text_labels = tmp / "text_labels.csv"
    _tabular(40, 6).assign(label=lambda t: np.where(t.label == 0, "cat", "dog")).to_csv(
        text_labels, index=False
    )
    rng = np.random.default_rng(0)
    upper = _write_npz(tmp / "upper.npz", X=rng.normal(size=(40, 4)), y=np.arange(40) % 2)
    short = _write_npz(tmp / "short.npz", x=rng.normal(size=(40, 4)), y=np.arange(39) % 2)
    nan_x = rng.normal(size=(40, 4))
    nan_x[5, 1] = np.nan
    nan_npz = _write_npz(tmp / "nan.npz", x=nan_x, y=np.arange(40) % 2)
    hf = ["data.name=hf"]
    natural = [*hf, f"data.source={sources.saved}", "data.partition=natural"]
    return [
        ([*hf, f"data.source={tmp / 'missing.csv'}"], "data.source", "no such file"),
        ([*hf, f"data.source={tmp / 'table.txt'}"], "data.source", "no such file"),
        (hf, "data.source", "requires a source"),
        ([*hf, f"data.source={sources.csv}"], "data.label_key", "no label column"),
        ([*hf, f"data.source={sources.csv}", "data.label_key=colour"], "data.label_key", "no such column"),
        ([*hf, f"data.source={sources.parquet}", "data.input_key=pixels"], "data.input_key", "no such"),
        ([*hf, f"data.source={text_labels}"], "data.label_key", "not integer-like"),
        ([*hf, f"data.source={nan_csv}"], "data.input_key", "NaN"),
        ([*hf, f"data.source={sources.images}", "data.test_split=validation"], "data.test_split", "no such"),
        (["data.name=npz", f"data.path={upper}"], "data.path", "lacks array 'x'"),
        (["data.name=npz", f"data.path={short}"], "data.path", "differ in length"),
        (["data.name=npz", f"data.path={nan_npz}"], "data.path", "NaN"),
        (["data.name=npz", f"data.path={tmp / 'none.npz'}"], "data.path", "does not exist"),
        ([*hf, f"data.source={sources.images}", "num_clients=100"], "num_clients", "fewer than the clients"),
        ([*natural, "data.partition_by=writer", "num_clients=3"], "num_clients", "num_clients=4"),
        ([*natural, "data.partition_by=author", "num_clients=4"], "data.partition_by", "no such column"),
        (["data.partition=natural", "data.partition_by=writer"], "data.partition_by", "no such column"),
        (["data.partition=exponential", "num_clients=20"], "data.partition", "cannot split"),
    ]


def test_every_bad_source_exits_2_with_one_line_naming_the_key(sources, tmp_path, capsys) -> None:
    cases = _bad_sources(sources, tmp_path)
    for overrides, key, problem in cases:
        out = tmp_path / "out"
        status = main(["simulate", str(QUICK), *overrides, f"output_dir={out}", "clients_per_round=1"])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert status == 2, (overrides, err)
        assert len(lines) == 1, (overrides, err)
        assert lines[0].startswith(f"fedeq: error: {key}: "), (overrides, lines[0])
        assert problem in lines[0] and "; allowed: " in lines[0], (overrides, lines[0])
        assert "Traceback" not in err and not out.exists()


def test_npz_with_upper_case_x_exits_2_from_the_command_line(tmp_path) -> None:
    bad = _write_npz(tmp_path / "bad.npz", X=np.zeros((40, 4)), y=np.arange(40) % 2)
    res = subprocess.run(
        [sys.executable, "-m", "fedeq.cli.main", "simulate", "data.name=npz", f"data.path={bad}"]
        + [f"output_dir={tmp_path / 'out'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert re.fullmatch(r"fedeq: error: data\.path: bad\.npz lacks array 'x' .*\n", res.stderr), res.stderr
    assert not (tmp_path / "out").exists()


def test_tiny_partitions_are_one_warning_not_an_error(caplog) -> None:
    cfg = load_config(QUICK, ["num_clients=40", "clients_per_round=4", "train.batch_size=64"])
    with caplog.at_level(logging.WARNING, logger="fedeq.data.checks"):
        check_data(cfg)
    records = [r for r in caplog.records if r.name == "fedeq.data.checks"]
    assert len(records) == 1 and "40 of 40 partitions" in records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedeq.data.checks"):
        check_data(load_config(QUICK))
    assert not [r for r in caplog.records if r.name == "fedeq.data.checks"]


def test_source_check_hook_is_called_before_loading() -> None:
    calls: list[str] = []

    class Picky(fedeq.data.DatasetSource):  # type: ignore[name-defined]
        def check(self, data_cfg) -> None:
            calls.append("check")
            raise ConfigError("data.test_fraction", "too large", "at most 0.3", data_cfg.test_fraction)

        def load(self, path, test_path):
            calls.append("load")
            raise AssertionError("not reached")

    DATASETS.register("test_picky", Picky)
    try:
        with pytest.raises(ConfigError, match=r"^data\.test_fraction: too large"):
            check_data(load_config(QUICK, ["data.name=test_picky"]))
        assert calls == ["check"]
    finally:
        DATASETS.unregister("test_picky")


# ---------------------------------------- federated runs (Ray)


def _run(tmp_path: Path, *overrides: str) -> tuple[dict, pd.DataFrame]:
    from fedeq.engines.simulate import simulate

    cfg = load_config(QUICK, [f"output_dir={tmp_path}", "run_name=run", *overrides])
    check_data(cfg)
    out = simulate(cfg, quiet=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["clients_failed"] == 0
    return summary, pd.read_csv(out / "partitions.csv")


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("kind", ["images", "parquet", "csv"])
def test_hf_sources_train_for_two_rounds(sources, tmp_path, kind: str) -> None:
    extra = ["data.label_key=species"] if kind == "csv" else []
    summary, parts = _run(tmp_path, "data.name=hf", f"data.source={getattr(sources, kind)}", *extra)
    assert parts["num_examples"].sum() == (72 if kind == "images" else 128)
    assert summary["final_test_acc"] > summary["initial_test_acc"]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_saved_dataset_trains_with_natural_partitions(sources, tmp_path) -> None:
    overrides = ["data.name=hf", f"data.source={sources.saved}", "data.partition=natural"]
    summary, parts = _run(tmp_path, *overrides, "data.partition_by=writer", "num_clients=4")
    assert parts["num_examples"].tolist() == list(WRITER_COUNTS.values())
    assert summary["final_test_acc"] > summary["initial_test_acc"]


# ---------------------------------------- docs/custom_data.md


def _doc_blocks() -> list[str]:
    return [code for lang, code in fenced_blocks(ROOT / "docs" / "custom_data.md") if lang == "python"]


def test_doc_has_a_plugin_file_and_a_federated_run() -> None:
    blocks = _doc_blocks()
    assert any(b.startswith("# file: ") and "@register_dataset" in b for b in blocks)
    assert any("simulate(cfg" in b and "plugins=[" in b for b in blocks)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_doc_code_runs(tmp_path, monkeypatch) -> None:
    """Each ```python block runs in order in a fresh folder; a block starting ``# file: NAME`` is saved."""
    monkeypatch.chdir(tmp_path)
    try:
        run_doc(ROOT / "docs" / "custom_data.md", tmp_path)
    finally:
        DATASETS.unregister("blobs")
    (summary_file,) = (tmp_path / "outputs").glob("*/summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["rounds_completed"] == 2 and summary["final_test_acc"] > 0.6
