"""Opening the ``data.source`` of ``data.name=hf`` with the ``datasets`` library, and picking its splits.

A source is, in this order of precedence:

- a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (``load_from_disk``);
- any other directory: an image folder (``datasets.load_dataset("imagefolder", data_dir=...)``: one
  sub-folder per class, optionally under ``train/`` and ``test/``);
- a ``.parquet`` or ``.csv`` file;
- anything else that does not look like a local path: a Hugging Face Hub id (``ylecun/mnist``), which
  needs the internet (or the local Hugging Face cache).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fedeq.config.errors import ConfigError

if TYPE_CHECKING:
    import datasets

__all__ = ["SOURCE_ALLOWED", "FILE_BUILDERS", "open_source", "pick_splits"]

SOURCE_ALLOWED = (
    "a Hugging Face Hub id, a directory saved with save_to_disk, an image folder, or a .parquet/.csv file"
)
"""What ``data.source`` may be (the ``allowed`` of its errors)."""

FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv"}
"""File suffix -> the ``datasets`` builder that reads it."""

_SAVED_MARKERS = ("dataset_dict.json", "state.json")


@contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars while loading (the console keeps one line per problem)."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _looks_local(source: str) -> bool:
    return (
        source.startswith(("/", ".", "~"))
        or "\\" in source
        or Path(source).suffix.lower() in FILE_BUILDERS
        or source.count("/") > 1
    )


@functools.lru_cache(maxsize=4)
def open_source(source: str) -> dict[str, datasets.Dataset]:
    """The splits of ``source`` by name (a single saved ``Dataset`` is the split ``train``).

    Cached per process (the splits are memory-mapped Arrow tables). Problems are a :class:`ConfigError`
    on ``data.source``.
    """
    import datasets

    path = Path(source).expanduser()

    def fail(problem: str) -> ConfigError:
        return ConfigError("data.source", problem, SOURCE_ALLOWED, source)

    try:
        with _quiet():
            if path.is_dir():
                if any((path / marker).is_file() for marker in _SAVED_MARKERS):
                    loaded = datasets.load_from_disk(str(path))
                else:
                    loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
            elif path.is_file():
                builder = FILE_BUILDERS.get(path.suffix.lower())
                if builder is None:
                    raise fail(f"unsupported file type '{path.suffix}'")
                loaded = datasets.load_dataset(builder, data_files=str(path))
            elif _looks_local(source):
                raise fail("no such file or directory")
            else:  # a Hub id: needs the internet unless it is in the local cache
                loaded = datasets.load_dataset(source)
    except ConfigError:
        raise
    except Exception as exc:  # the datasets library raises many types; each is a bad source here
        text = " ".join(str(exc).split())[:300]
        raise fail(f"cannot load ({type(exc).__name__}: {text})") from exc
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    if not isinstance(loaded, datasets.DatasetDict) or not loaded:
        raise fail("not a dataset with splits")
    return dict(loaded)


def pick_splits(
    splits: dict[str, datasets.Dataset], train_split: str | None, test_split: str | None
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """``(train, test)``: ``train_split`` (default ``train``) and ``test_split``; without ``test_split``
    the source's own ``test`` split if it has one, else None (the caller carves ``data.test_fraction``)."""
    names = ", ".join(splits)
    train_name = train_split or "train"
    if train_name not in splits:
        raise ConfigError("data.train_split", "the source has no such split", f"one of: {names}", train_name)
    if test_split is None:
        own = splits.get("test") if train_name != "test" else None
        return splits[train_name], own
    if test_split not in splits or test_split == train_name:
        allowed = f"null (the source's test split, else data.test_fraction) or another of: {names}"
        raise ConfigError("data.test_split", "the source has no such split", allowed, test_split)
    return splits[train_name], splits[test_split]
