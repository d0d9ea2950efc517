"""The runs of ``fedeq sweep``: ``--grid`` parsing, the cartesian product, which grid keys apply to which
grid point, the seeds, and the checks that a sweep folder belongs to this sweep.

A grid point is one combination of grid values; a run is a grid point with one seed. A grid key that does
not apply to a grid point (:data:`RULES`, and ``strategy.kwargs.<k>`` for strategies whose constructor does
not take ``k``) is left out of that point's overrides, so combinations that would only differ in it collapse
into one grid point.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedeq.config import ConfigError, config_from_yaml, load_config, to_yaml

__all__ = [
    "RESERVED_KEYS",
    "RULES",
    "GridPoint",
    "SweepPlan",
    "applies",
    "check_sweep_folder",
    "expand",
    "make_plan",
    "parse_grid",
    "parse_seeds",
    "split_values",
]

RESERVED_KEYS = {
    "seed": "--seeds N or --seed-list S1,S2",
    "output_dir": "--out DIR",
    "run_name": "--out DIR",
}
"""Keys a ``--grid`` may not sweep, with what sets them instead."""

RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "data.alpha": ("data.partition=dirichlet", lambda cfg: cfg.data.partition == "dirichlet"),
    "data.labels_per_client": (
        "data.partition=shards|pathological",
        lambda cfg: cfg.data.partition in ("shards", "pathological"),
    ),
    "devices.deadline_policy": ("devices.deadline_s set", lambda cfg: cfg.devices.deadline_s is not None),
}
"""Grid key -> (when it applies, in words; the test on a grid point's resolved config)."""

MANIFEST = "sweep.json"
BASE_CONFIG = "base_config.yaml"
IDENTITY_EXEMPT = frozenset(RESERVED_KEYS)
"""Config keys that may differ between two invocations of one sweep (the seeds are kept apart)."""


def split_values(text: str) -> list[str]:
    """Split ``text`` at the commas outside brackets and quotes: ``1,[2,3],'a,b'`` -> 3 values."""
    values, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += char
    values.append(current.strip())
    return values


def parse_grid(items: Sequence[str], overrides: Sequence[str] = ()) -> dict[str, list[str]]:
    """``["KEY=V1,V2", ...]`` -> ``{KEY: [V1, V2]}``, in the order given; a :class:`ConfigError` naming
    ``--grid`` or the key for a malformed item, a reserved or repeated key or a repeated value."""
    fixed = {item.split("=", 1)[0].strip() for item in overrides}
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        values = split_values(text) if sep else []
        if not key or not sep or any(not v for v in values):
            raise ConfigError("--grid", "expected KEY=V1,V2,...", "--grid strategy.name=fedavg,quality", item)
        if key in RESERVED_KEYS:
            raise ConfigError(key, "cannot be swept with --grid", RESERVED_KEYS[key], item)
        if key in grid:
            raise ConfigError(key, "given in two --grid options", "one --grid per key", item)
        if key in fixed:
            raise ConfigError(key, "set both by --grid and by key=value", "one of them", item)
        if len(set(values)) < len(values):
            raise ConfigError(key, "a --grid value is repeated", "distinct values", text)
        grid[key] = values
    return grid


def parse_seeds(count: int | None, seed_list: str | None, base: int) -> list[int]:
    """The seeds of every grid point: ``base + 0 .. count - 1``, or the ``--seed-list``."""
    if seed_list is not None:
        try:
            seeds = [int(s) for s in split_values(seed_list)]
        except ValueError:
            raise ConfigError("--seed-list", "expected integers", "--seed-list 0,1,2", seed_list) from None
        if len(set(seeds)) < len(seeds) or any(s < 0 for s in seeds):
            raise ConfigError(
                "--seed-list", "seeds must be distinct and >= 0", "--seed-list 0,1,2", seed_list
            )
        return seeds
    n = 1 if count is None else count
    if n < 1:
        raise ConfigError("--seeds", "must be at least 1", "an integer >= 1", n)
    return [base + k for k in range(n)]


def applies(key: str, cfg: Any) -> bool:
    """Whether grid key ``key`` matters for a run with the resolved config ``cfg`` (see the module doc)."""
    if key.startswith("strategy.kwargs."):
        from strategies.registry import GUARD_PARAMETERS, accepted_parameters, resolve_strategy_class

        name = key.removeprefix("strategy.kwargs.").split(".")[0]
        try:
            params, closed = accepted_parameters(resolve_strategy_class(cfg.strategy.name))
        except ValueError:
            return True  # an unknown strategy is reported by the run's own checks
        return not closed or name in params or name in GUARD_PARAMETERS
    rule = RULES.get(key)
    return rule is None or bool(rule[1](cfg))


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other key ends with."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            short = ".".join(parts[-n:])
            if not any(k != key and (k == short or k.endswith("." + short)) for k in keys):
                break
        names[key] = short
    return names


@dataclass(frozen=True)
class GridPoint:
    """One combination of grid values (only the keys that apply to it) and its folder name."""

    values: dict[str, str]
    slug: str
    short: dict[str, str] = field(default_factory=dict)
    """Grid key -> the shortest dotted suffix that tells it from the other grid keys."""

    @property
    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.values.items()]

    def label(self) -> str:
        """``name=quality, quality=residual`` (short key names), or ``base config`` without a grid."""
        return ", ".join(f"{self.short.get(k, k)}={v}" for k, v in self.values.items()) or "base config"


def _slug(values: Mapping[str, str], short: Mapping[str, str]) -> str:
    text = "__".join(f"{short[k]}={v}" for k, v in values.items()) or "base"
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", text)[:150]


def expand(path: str | None, overrides: Sequence[str], grid: Mapping[str, Sequence[str]]) -> list[GridPoint]:
    """The grid points of ``grid`` over the config ``path`` + ``overrides``: the cartesian product, each
    combination without the keys that do not apply to it, duplicates dropped (first occurrence kept).

    A :class:`ConfigError` naming the key for a value that fails validation or a key that applies to no
    grid point.
    """
    keys = list(grid)
    short = _short_names(keys)
    points: list[GridPoint] = []
    used: set[str] = set()
    for combo in itertools.product(*(grid[k] for k in keys)):
        chosen = dict(zip(keys, combo, strict=True))
        cfg = load_config(path, [*overrides, *(f"{k}={v}" for k, v in chosen.items())])
        kept = {k: v for k, v in chosen.items() if applies(k, cfg)}
        used |= set(kept)
        if all(p.values != kept for p in points):
            points.append(GridPoint(kept, _slug(kept, short), short))
    for key in keys:
        if key not in used:
            raise ConfigError(key, "applies to no grid point", _applies_text(key), ",".join(grid[key]))
    slugs = [p.slug for p in points]
    return [
        p if slugs.count(p.slug) == 1 else GridPoint(p.values, f"{p.slug}-{_digest(p.values)}", short)
        for p in points
    ]


def _digest(values: Mapping[str, str]) -> str:
    """A short name of ``values`` for folder names that would otherwise coincide (``a/b`` and ``a_b``)."""
    return hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]


def _applies_text(key: str) -> str:
    if key.startswith("strategy.kwargs."):
        return "a strategy.name whose constructor takes this keyword in the grid or config"
    return RULES[key][0] if key in RULES else "any config"


@dataclass(frozen=True)
class SweepPlan:
    """What one ``fedeq sweep`` command runs: base config, grid, grid points, seeds and folder."""

    path: str | None
    overrides: list[str]
    grid: dict[str, list[str]]
    points: list[GridPoint]
    seeds: list[int]
    out: Path
    base: Any = field(repr=False, default=None)

    def run_dir(self, point: GridPoint, seed: int) -> Path:
        return self.out / "runs" / point.slug / f"seed-{seed}"

    def run_config(self, point: GridPoint, seed: int) -> Any:
        """The validated config of one run (its folder fixed by ``output_dir`` and ``run_name``)."""
        folder = self.run_dir(point, seed)
        fixed = [f"seed={seed}", f"output_dir={folder.parent}", f"run_name={folder.name}"]
        return load_config(self.path, [*self.overrides, *point.overrides, *fixed])

    def runs(self) -> list[tuple[GridPoint, int]]:
        return [(p, s) for p in self.points for s in self.seeds]


def make_plan(
    path: str | None,
    overrides: Sequence[str],
    grid_items: Sequence[str],
    seeds: tuple[int | None, str | None],
    out: Path | None,
) -> SweepPlan:
    """Parse and expand a sweep; ``out`` defaults to ``output_dir/run_name`` or ``output_dir/sweep-<t>``."""
    from fedeq.results.recorder import run_dir

    grid = parse_grid(grid_items, overrides)
    base = load_config(path, overrides)
    points = expand(path, overrides, grid)
    seed_values = parse_seeds(*seeds, base=int(base.seed))
    if out is None:
        out = run_dir(base.output_dir, base.run_name or None)
        if not base.run_name:
            out = out.with_name(f"sweep-{out.name}")
    return SweepPlan(path, list(overrides), grid, points, seed_values, Path(out), base)


def check_sweep_folder(plan: SweepPlan) -> bool:
    """Whether ``plan.out`` already holds this sweep (``False``: empty or absent). A :class:`ConfigError`
    naming ``--out`` when it holds something else, or a sweep with another config or other grid keys (the
    values of the grid keys and the seeds may change: every run folder is named by its values and seed)."""
    from fedeq.cli.resume import changed_keys
    from fedeq.results.recorder import run_taken

    out = plan.out
    if not run_taken(out):
        return False
    manifest = out / MANIFEST
    if not manifest.is_file() or not (out / BASE_CONFIG).is_file():
        allowed = "an empty or new folder, or the folder of this sweep"
        raise ConfigError("--out", f"{out} is not a fedeq sweep folder (no {MANIFEST})", allowed, str(out))
    saved = json.loads(manifest.read_text())
    other = "the folder of an earlier sweep holds a different"
    changed = {
        k: v
        for k, v in changed_keys(config_from_yaml((out / BASE_CONFIG).read_text()), plan.base).items()
        if k.split(".")[0] not in IDENTITY_EXEMPT
    }
    if changed:
        key, got = next(iter(changed.items()))
        problem = f"{other} config in {out} ({key} differs)"
        raise ConfigError("--out", problem, "the same config and overrides, or another --out", got)
    old = {k: list(v) for k, v in (saved.get("grid") or {}).items()}
    if list(old) != list(plan.grid):
        problem = f"{other} grid in {out} ({_grid_text(old)})"
        allowed = "the same --grid keys in the same order (their values may change), or another --out"
        raise ConfigError("--out", problem, allowed, _grid_text(plan.grid))
    return True


def _grid_text(grid: Mapping[str, Sequence[str]]) -> str:
    return " ".join(f"--grid {k}={','.join(v)}" for k, v in grid.items()) or "no --grid"


def write_manifest(plan: SweepPlan) -> None:
    """Record the sweep in its folder (``sweep.json``: grid, seeds, config and overrides;
    ``base_config.yaml``: the resolved base config)."""
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / BASE_CONFIG).write_text(to_yaml(plan.base))
    data = {
        "config": plan.path,
        "overrides": plan.overrides,
        "grid": plan.grid,
        "seeds": plan.seeds,
        "points": [{"slug": p.slug, "values": p.values} for p in plan.points],
    }
    (plan.out / MANIFEST).write_text(json.dumps(data, indent=2))
