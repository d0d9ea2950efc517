"""Flower ServerApp: builds the global DEQ, the strategy and the central evaluation, and records the run.

The same :func:`run_server` drives every engine (Flower's simulation runtime, fedeq's Ray engine, a real
SuperLink): it only talks to a ``flwr.serverapp.Grid``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from clients.client_app import tier_deq_settings
from fedeq.arrays import record_from_numpy, record_to_numpy, record_to_state_dict
from fedeq.config.core import RUN_CONFIG_KEY, assign_tiers, attribute_view, config_from_run_config, to_yaml
from fedeq.data.core import load_dataset, partition_sizes
from fedeq.devices.clock import client_sim_time
from fedeq.models.core import build_model, num_parameters
from fedeq.results.checkpoint import (
    Journal,
    journaled_lists,
    load_checkpoint,
    restore_strategy,
    rng_state,
    save_checkpoint,
    set_rng_state,
    snapshot_strategy,
)
from fedeq.results.recorder import RunRecorder, run_dir
from fedeq.server.loop import run_rounds
from fedeq.train.local import accuracy_vs_budget, evaluate, resolve_device
from strategies.registry import build_strategy

console = Console(stderr=True)


def reference_tier(cfg: Any) -> Any:
    """The tier with the largest forward budget: the global model's headline accuracy uses its settings."""
    return max(cfg.devices.tiers, key=lambda t: t.f_max_iter)


def strategy_for(cfg: Any) -> Any:
    """The configured strategy (with the reply guard), sampling ``clients_per_round`` of ``num_clients``.

    Raises ``ValueError`` naming ``strategy.name`` or ``strategy.kwargs.<key>`` when they are invalid.
    """
    n = cfg.num_clients
    min_nodes = cfg.strategy.min_available_nodes or n
    return build_strategy(
        cfg.strategy.name,
        dict(cfg.strategy.kwargs),
        fraction_train=cfg.clients_per_round / n,
        min_train_nodes=min(cfg.clients_per_round, min_nodes),
        min_available_nodes=min_nodes,
        fraction_evaluate=cfg.strategy.fraction_evaluate,
        min_evaluate_nodes=1 if cfg.strategy.fraction_evaluate > 0 else 0,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def reply_sim_time(tier: Any, metrics: Mapping[str, Any], model_bytes: int, nfe_cost_s: float) -> float:
    """Simulated seconds of a client call from its reported metrics (see :mod:`fedeq.devices.clock`)."""
    return client_sim_time(
        tier,
        nfe_fwd=float(metrics.get("nfe-fwd", 0.0)),
        nfe_bwd=float(metrics.get("nfe-bwd", 0.0)),
        samples=float(metrics.get("samples", metrics.get("num-examples", 0))),
        bytes_down=model_bytes,
        bytes_up=model_bytes,
        nfe_cost_s=nfe_cost_s,
    ).total_s


class _RoundBook:
    """Turns the strategy's per-reply log into rows of ``rounds.csv`` and ``clients.csv``."""

    def __init__(
        self,
        devices: Any,
        strategy: Any,
        model_bytes: int,
        recorder: RunRecorder,
        node_config: Callable[[int], Mapping[str, Any]] | None = None,
    ) -> None:
        self.node_config = node_config
        self.strategy = strategy
        self.model_bytes = model_bytes
        self.recorder = recorder
        self.devices = devices
        """``cfg.devices`` as :func:`~fedeq.config.core.attribute_view` (read per reply: not OmegaConf)."""
        self.tier_names = [t.name for t in self.devices.tiers]
        self.cum_sim = 0.0
        self.t_last = time.perf_counter()

    def client_rows(self, server_round: int) -> list[dict[str, Any]]:
        log = self.strategy.round_entries(server_round)
        quality = getattr(self.strategy, "last_quality", {})
        weights = getattr(self.strategy, "last_weights", {})
        rows = []
        for e in log:
            tier_idx = e.get("tier")
            partition = e.get("partition-id")
            if tier_idx is None and self.node_config is not None:  # failed calls carry no metrics
                info = self.node_config(int(e["node_id"]))
                partition = info.get("partition-id")
                tier_idx = (
                    self.tier_names.index(info["tier"]) if info.get("tier") in self.tier_names else None
                )
            tier = self.devices.tiers[int(tier_idx)] if tier_idx is not None else None
            sim = None
            if tier is not None and e["status"] in ("ok", "dropped"):
                sim = reply_sim_time(tier, e, self.model_bytes, self.devices.nfe_cost_s)
            node = int(e["node_id"])
            ok = e["status"] == "ok"
            rows.append(
                {
                    "round": server_round,
                    "node_id": node,
                    "partition": partition,
                    "tier": tier.name if tier is not None else None,
                    "num_examples": e.get("num-examples"),
                    "quality": quality.get(node) if ok else None,
                    "weight": weights.get(node) if ok else 0.0,
                    "residual": e.get("fp-residual"),
                    "nfe_fwd": e.get("nfe-fwd"),
                    "nfe_bwd": e.get("nfe-bwd"),
                    "train_loss": e.get("train-loss"),
                    "val_loss": e.get("val-loss"),
                    "compute_s": e.get("compute-s"),
                    "compute_cpu_s": e.get("compute-cpu-s"),
                    "sim_time_s": sim,
                    "status": e["status"],
                    "reason": e.get("reason") or "",
                }
            )
        return rows

    def close_round(self, server_round: int, evals: dict[str, float]) -> dict[str, Any]:
        clients = self.client_rows(server_round)
        counts = getattr(self.strategy, "round_counts", {}).get(server_round, {})
        sims = [c["sim_time_s"] for c in clients if c["status"] == "ok" and c["sim_time_s"] is not None]
        sim = max(sims) if sims else 0.0
        deadline = self.devices.deadline_s
        if deadline is not None and (counts.get("dropped", 0) or sim > deadline):
            sim = deadline  # the server closes the round at the deadline
        self.cum_sim += sim
        now = time.perf_counter()
        n_sent = len(clients) - int(counts.get("offline", 0))
        n_ok = int(counts.get("ok", 0))
        row = {
            "round": server_round,
            "wall_s": now - self.t_last,
            "sim_time_s": sim,
            "cum_sim_time_s": self.cum_sim,
            **evals,
            "bytes_up": n_ok * self.model_bytes,
            "bytes_down": n_sent * self.model_bytes,
            "clients_ok": n_ok,
            "clients_failed": int(counts.get("failed", 0)),
            "clients_rejected": int(counts.get("rejected", 0)),
            "clients_offline": int(counts.get("offline", 0)),
            "clients_dropped": int(counts.get("dropped", 0)),
        }
        self.t_last = now
        self.recorder.add_round(row, clients)
        return row


def deadline_check(devices: Any, model_bytes: int) -> Callable[[Mapping[str, Any]], tuple[str, str] | None]:
    """Reply check for ``devices.deadline_policy=drop`` (``devices``: ``cfg.devices`` as an attribute view):
    a reply whose simulated time is past the deadline is dropped (it would have arrived after the server
    closed the round)."""
    deadline = float(devices.deadline_s)

    def check(metrics: Mapping[str, Any]) -> tuple[str, str] | None:
        tier = devices.tiers[int(metrics.get("tier", 0))]
        t = reply_sim_time(tier, metrics, model_bytes, devices.nfe_cost_s)
        if t > deadline:
            return "dropped", f"deadline: simulated time {t:.3f}s > deadline_s={deadline:g}"
        return None

    return check


def _owned_by(lists: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """The journaled lists named ``"<owner>.<attribute>"``, by attribute."""
    parts = {name: name.partition(".") for name in lists}
    return {attr: lists[name] for name, (who, _, attr) in parts.items() if who == owner}


def run_server(
    grid: Grid, cfg: Any, out_dir: Path | None = None, quiet: bool = False, resume: bool = False
) -> Path:
    """Run the whole federated training for ``cfg`` over ``grid``; return the output folder.

    After every round the output files and ``checkpoint.pkl`` are rewritten; with ``resume`` the run
    continues after the last checkpointed round of ``out_dir`` with every state restored.
    """
    seed_everything(cfg.seed)
    out = Path(out_dir) if out_dir is not None else run_dir(cfg.output_dir, cfg.run_name)
    config_yaml = to_yaml(cfg)
    recorder = RunRecorder(out, config_yaml)
    tiers = list(cfg.devices.tiers)
    assignment = assign_tiers(cfg)
    sizes = partition_sizes(cfg.data, cfg.num_clients, cfg.seed)
    recorder.save_partitions(sizes, [tiers[i].name for i in assignment])

    splits = load_dataset(cfg.data.name, cfg.data.path, cfg.data.test_path, cfg.data.test_fraction, cfg.seed)
    device = resolve_device(cfg.train.device)
    model = build_model(cfg.model.name, splits.input_shape, splits.num_classes, cfg.model)
    arrays = ArrayRecord(model.state_dict())
    model_bytes = arrays.count_bytes()
    recorder.extra.update(
        model=cfg.model.name,
        num_parameters=num_parameters(model),
        model_bytes=model_bytes,
        strategy=cfg.strategy.name,
        engine=cfg.engine,
    )

    strategy = strategy_for(cfg)
    devices = attribute_view(cfg.devices)
    if devices.deadline_s is not None and devices.deadline_policy == "drop":
        strategy.reply_checks.append(deadline_check(devices, model_bytes))
    book = _RoundBook(devices, strategy, model_bytes, recorder, getattr(grid, "node_config", None))
    ref = reference_tier(cfg)
    budgets_by_tier = {t.name: tier_deq_settings(cfg, t) for t in tiers}
    main_settings = budgets_by_tier[ref.name]

    start_round = 1
    journal = Journal(out)
    if not resume:
        journal.path.unlink(missing_ok=True)  # a journal left in a reused output folder by an earlier run
    else:
        state = load_checkpoint(out)
        start_round = int(state["round"]) + 1
        arrays = record_from_numpy(state["arrays"])
        restore_strategy(strategy, state["strategy"])
        # Checkpoints written before the journal kept these lists whole in checkpoint.pkl: no "journal" key.
        lists = state.get("journal", {})
        for attr, items in _owned_by(lists, "strategy").items():
            setattr(strategy, attr, items)
        recorder.restore({**state["recorder"], **_owned_by(lists, "recorder")})
        journal.lengths = {name: len(items) for name, items in lists.items()}
        book.cum_sim = state["cum_sim"]
        set_rng_state(state["rng"])
        if not quiet:
            console.print(f"resuming {out} after round {state['round']}", soft_wrap=True)

    def evaluate_global(server_round: int, global_arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(record_to_state_dict(global_arrays))
        main = evaluate(model, splits.x_test, splits.y_test, device=device, **main_settings)
        evals = {"test_acc": main.accuracy, "test_loss": main.loss, "test_residual": main.fp_residual}
        for name, settings in budgets_by_tier.items():
            if settings == main_settings:  # the reference tier's own row: already evaluated
                evals[f"test_acc@{name}"] = main.accuracy
                continue
            st = evaluate(model, splits.x_test, splits.y_test, device=device, **settings)
            evals[f"test_acc@{name}"] = st.accuracy
        if server_round == 0:
            book.t_last = time.perf_counter()
            recorder.extra["initial_test_acc"] = main.accuracy
            return MetricRecord(evals)
        row = book.close_round(server_round, evals)
        if server_round == cfg.rounds:
            recorder.curve = accuracy_vs_budget(
                model,
                splits.x_test,
                splits.y_test,
                cfg.eval.budgets,
                device=device,
                solver=ref.solver,
                tol=cfg.model.tol,
                stop_mode=cfg.model.stop_mode,
            )
        recorder.write(plots=False, append=True)  # the run's end writes the plots and every file whole
        if not quiet:
            extra = "".join(
                f" {k[8:]} {row[k]}" for k in ("clients_offline", "clients_dropped") if row.get(k)
            )
            console.print(
                f"[bold]round {server_round:>3}/{cfg.rounds}[/] acc {main.accuracy:.4f} loss {main.loss:.4f} "
                f"ok {row['clients_ok']} failed {row['clients_failed']} "
                f"rejected {row['clients_rejected']}{extra} "
                f"sim {row['sim_time_s']:.2f}s wall {row['wall_s']:.2f}s",
                soft_wrap=True,
            )
        return MetricRecord(evals)

    def end_of_round(server_round: int, global_arrays: ArrayRecord) -> Callable[[], None]:
        # The strategy and the RNGs are captured now, before the next round touches them; the results and
        # the checkpoint are written once the round's central evaluation has recorded its row.
        strategy_snapshot = snapshot_strategy(strategy)
        tails = journal.take({f"strategy.{k}": v for k, v in journaled_lists(strategy).items()})
        lengths = {name: journal.lengths[name] for name in tails}
        rng = rng_state()

        def write_checkpoint() -> None:
            rec = recorder.state()
            rows = {"recorder.rounds": rec.pop("rounds"), "recorder.clients": rec.pop("clients")}
            tails.update(journal.take(rows))
            lengths.update({name: journal.lengths[name] for name in rows})
            journal.append(server_round, tails)
            save_checkpoint(
                out,
                {
                    "round": server_round,
                    "arrays": record_to_numpy(global_arrays),
                    "strategy": strategy_snapshot,
                    "recorder": rec,
                    "cum_sim": book.cum_sim,
                    "rng": rng,
                    "journal": lengths,
                },
            )

        return write_checkpoint

    t0 = time.perf_counter()
    result = run_rounds(
        strategy,
        grid,
        arrays,
        cfg.rounds,
        start_round=start_round,
        train_config=ConfigRecord({RUN_CONFIG_KEY: config_yaml}),
        evaluate_config=ConfigRecord({RUN_CONFIG_KEY: config_yaml}),
        evaluate_fn=evaluate_global,
        on_round_end=end_of_round,
        overlap=True,
        timeout=cfg.strategy.round_timeout_s or 3600.0,
    )
    torch.save(record_to_state_dict(result.arrays), out / "global_model.pt")
    recorder.write(summary={"wall_s": time.perf_counter() - t0, "output_dir": str(out)})
    return out


def make_server_app(cfg: Any | None = None, out_dir: Path | None = None, quiet: bool = False) -> ServerApp:
    """A ServerApp for ``cfg``; without one, the config comes from the run config (``flwr run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else config_from_run_config(dict(context.run_config))
        run_server(grid, run_cfg, out_dir=out_dir, quiet=quiet)

    return app


app = make_server_app()
