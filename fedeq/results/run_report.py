"""The closing account of a run, read back from its folder (``rounds.csv``, ``clients.csv``, ``summary.json``
and ``config.yaml``), so that it is the same after ``--resume`` as after one uninterrupted run."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

__all__ = ["CALL_STATUSES", "RunReport", "read_report"]

CALL_STATUSES = ("ok", "failed", "rejected", "offline", "dropped")
"""What can become of a client call (``clients_<status>`` in ``rounds.csv``); only ``ok`` is aggregated."""


@dataclass(frozen=True)
class RunReport:
    """What a finished run did, from its own records."""

    out_dir: Path
    rounds_done: int
    rounds_planned: int | None
    final_test_acc: float | None
    best_test_acc: float | None
    best_round: int | None
    wall_s_rounds: float
    """Wall-clock seconds of the rounds (over every session of a resumed run)."""
    wall_s_session: float | None
    """Wall-clock seconds of the last session, start-up and final evaluation included."""
    sim_time_s: float
    bytes_up: int
    bytes_down: int
    calls: dict[str, int] = field(default_factory=dict)
    """Client calls by status (:data:`CALL_STATUSES`)."""
    empty_rounds: tuple[int, ...] = ()
    """Rounds that aggregated no client update."""
    top_reason: tuple[str, str, int] | None = None
    """``(status, reason, count)`` of the most frequent reason a call was not accepted."""
    final_personal_acc: float | None = None
    """Personalised runs: the last round's mean accuracy of the clients on their own test splits."""
    final_personal_worst10: float | None = None
    """Personalised runs: the last round's mean accuracy of the worst 10% of the clients."""

    @property
    def accepted(self) -> int:
        """Client updates that were aggregated."""
        return self.calls.get("ok", 0)

    def failure(self) -> str | None:
        """One line saying why the run failed (no client update accepted in any round), or ``None``."""
        if self.accepted or not self.rounds_done:
            return None
        total = sum(self.calls.values())
        counts = ", ".join(f"{n} {s}" for s, n in self.calls.items() if n and s != "ok")
        line = f"no client update was accepted in any of the {self.rounds_done} round(s) ({total} calls"
        line += f": {counts})" if counts else ")"
        if self.top_reason is None:
            return line
        status, reason, n = self.top_reason
        return f"{line}; most frequent reason ({status}, {n} of {total}): {reason}"


def _reason_key(status: str, reason: str) -> str:
    """Reasons that differ only in numbers (partition ids, error codes, residuals) count as one."""
    return re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", f"{status}|{reason}")


def top_reason(clients: pd.DataFrame) -> tuple[str, str, int] | None:
    """``(status, reason, count)`` of the most frequent reason among the calls not accepted."""
    if clients.empty or "status" not in clients:
        return None
    rows = clients[clients["status"] != "ok"]
    if rows.empty:
        return None
    pairs = [
        (str(s), "" if pd.isna(r) else str(r)) for s, r in zip(rows["status"], rows["reason"], strict=True)
    ]
    counts = Counter(_reason_key(s, r) for s, r in pairs)
    key, n = counts.most_common(1)[0]
    status, reason = next(p for p in pairs if _reason_key(*p) == key)
    return status, reason or status, n


def _read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.is_file() and path.stat().st_size else pd.DataFrame()


def _float(v: Any) -> float | None:
    return None if v is None or pd.isna(v) else float(v)


def read_report(out_dir: str | Path) -> RunReport:
    """The :class:`RunReport` of the run in ``out_dir``."""
    out = Path(out_dir)
    rounds = _read_csv(out / "rounds.csv")
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    config = out / "config.yaml"
    planned = (yaml.safe_load(config.read_text()) or {}).get("rounds") if config.is_file() else None

    def total(col: str) -> float:
        return float(rounds[col].fillna(0).sum()) if col in rounds else 0.0

    acc = rounds["test_acc"].astype(float) if "test_acc" in rounds else pd.Series(dtype=float)
    best = acc.idxmax() if acc.notna().any() else None
    ok = rounds["clients_ok"] if "clients_ok" in rounds else pd.Series(dtype=int)
    return RunReport(
        out_dir=out,
        rounds_done=int(rounds["round"].max()) if len(rounds) else 0,
        rounds_planned=int(planned) if planned is not None else None,
        final_test_acc=_float(acc.iloc[-1]) if len(acc) else None,
        best_test_acc=_float(acc[best]) if best is not None else None,
        best_round=int(rounds["round"][best]) if best is not None else None,
        wall_s_rounds=total("wall_s"),
        wall_s_session=_float(summary.get("wall_s")),
        sim_time_s=total("sim_time_s"),
        bytes_up=int(total("bytes_up")),
        bytes_down=int(total("bytes_down")),
        calls={s: int(total(f"clients_{s}")) for s in CALL_STATUSES},
        empty_rounds=tuple(int(r) for r in rounds["round"][ok == 0]) if len(ok) else (),
        top_reason=top_reason(_read_csv(out / "clients.csv")),
        final_personal_acc=_last(rounds, "personal_acc"),
        final_personal_worst10=_last(rounds, "personal_acc_worst10"),
    )


def _last(rounds: pd.DataFrame, col: str) -> float | None:
    """The last round's value of ``col`` (``None`` without the column)."""
    return _float(rounds[col].iloc[-1]) if col in rounds and len(rounds) else None
