"""Flower ServerApp: builds the global DEQ, the strategy and the round callbacks, and runs the rounds
(synchronous rounds, :mod:`fedeq.server.loop`; ``aggregation=async``, :mod:`fedeq.server.async_loop`).

The same :func:`run_server` drives every engine (Flower's simulation runtime, fedeq's Ray engine, a real
SuperLink): it only talks to a ``flwr.serverapp.Grid``.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from fedeq.arrays import record_from_state_dict
from fedeq.config import RUN_CONFIG_KEY, ConfigError, attribute_view, config_from_run_config, to_yaml
from fedeq.data import client_dataset, partition_sizes, server_validation
from fedeq.devices.assign import assign_tiers
from fedeq.devices.clock import reply_sim_time
from fedeq.devices.settings import tier_deq_settings
from fedeq.models import initial_model, num_parameters
from fedeq.personal import get_method, personal_keys, select
from fedeq.results.recorder import ASYNC_CLIENT_COLUMNS, RunRecorder, check_new_run, run_dir
from fedeq.server.async_book import AsyncRoundBook
from fedeq.server.async_loop import AsyncSettings, run_async, staleness_check
from fedeq.server.async_schedule import AsyncState
from fedeq.server.callbacks import (
    BudgetCurve,
    CentralEvaluation,
    Checkpointing,
    ConsoleReport,
    PersonalEvaluation,
    ResultsWriter,
    RoundCallback,
    RoundRecords,
)
from fedeq.server.loop import run_rounds
from fedeq.server.nodes import wait_for_nodes
from fedeq.server.personal_book import PERSONAL_CLIENT_COLUMNS, PersonalRoundBook
from fedeq.server.round_book import RoundBook
from fedeq.train import resolve_device
from strategies.guard import ReplyGuard
from strategies.registry import build_strategy
from strategies.server_eval import ServerEvaluator

console = Console(stderr=True)


def reference_tier(cfg: Any) -> Any:
    """The tier with the largest forward budget: the global model's headline accuracy uses its settings."""
    return max(cfg.devices.tiers, key=lambda t: t.f_max_iter)


def strategy_for(cfg: Any) -> ReplyGuard:
    """The configured strategy (with the reply guard), sampling ``clients_per_round`` of ``num_clients``.

    Raises ``ValueError`` naming ``strategy.name`` or ``strategy.kwargs.<key>`` when they are invalid.
    """
    n = cfg.num_clients
    min_nodes = cfg.strategy.min_available_nodes or n
    fraction = evaluate_fraction(cfg)
    # Without federated evaluation the guard sends no evaluate round; the strategy keeps its own
    # evaluate settings (Flower warns about fraction_evaluate=0.0 in every constructor call).
    evaluate: dict[str, Any] = {"fraction_evaluate": fraction, "min_evaluate_nodes": 1}
    if fraction <= 0:
        evaluate = {"min_evaluate_nodes": 0}
    guard = build_strategy(
        cfg.strategy.name,
        dict(cfg.strategy.kwargs),
        fraction_train=cfg.clients_per_round / n,
        min_train_nodes=min(cfg.clients_per_round, min_nodes),
        min_available_nodes=min_nodes,
        **evaluate,
    )
    guard.federated_evaluation = evaluate_fraction(cfg) > 0
    if "evaluate" in getattr(guard.strategy, "needs", ()) and not cfg.data.server_val_fraction > 0:
        problem = (
            f"strategy.kwargs.quality={getattr(guard.strategy, 'quality', None)!r} scores updates on the "
            "server's validation split, which is off"
        )
        raise ConfigError("data.server_val_fraction", problem, "a fraction in (0, 0.5), e.g. 0.05", 0.0)
    method = cfg.personalization.method
    if "evaluate" in getattr(guard.strategy, "needs", ()) and get_method(method).shares != "model":
        quality = getattr(guard.strategy, "quality", None)
        problem = (
            f"strategy.kwargs.quality={quality!r} scores whole models on the server, and "
            f"personalization.method={method} sends no whole model"
        )
        allowed = "none, ditto or finetune with this quality function, or another quality function"
        raise ConfigError("personalization.method", problem, allowed, method)
    return guard


def attach_server_evaluator(guard: ReplyGuard, cfg: Any, model: torch.nn.Module, device: Any) -> None:
    """Give the strategy a loss on the server's validation split (``data.server_val_fraction``) when its
    quality function needs one, at the settings of the tier with the largest forward budget."""
    inner: Any = guard.strategy
    if "evaluate" not in getattr(inner, "needs", ()):
        return
    x, y = server_validation(cfg.data, cfg.seed)
    settings = tier_deq_settings(cfg, reference_tier(cfg))
    inner.server_evaluate = ServerEvaluator(copy.deepcopy(model), x, y, device, settings)


def evaluate_fraction(cfg: Any) -> float:
    """Share of the clients that evaluate the global model each round: ``strategy.fraction_evaluate``, or
    the strategy's own ``fraction_evaluate`` given in ``strategy.kwargs`` (0: no federated evaluation);
    every client with ``personalization.method`` set (each is scored on its own test split)."""
    if cfg.personalization.method != "none":
        return 1.0
    return cfg.strategy.fraction_evaluate or float(cfg.strategy.kwargs.get("fraction_evaluate") or 0)


def shared_arrays(cfg: Any, model: torch.nn.Module) -> ArrayRecord:
    """The arrays the server keeps and sends: the whole model, or only what ``personalization.method``
    shares (the model without its personal modules, or nothing)."""
    state = model.state_dict()
    shares = get_method(cfg.personalization.method).shares
    if shares == "body":
        state = select(state, personal_keys(model, cfg.personalization.personal_modules), keep=False)
    elif shares == "nothing":
        state = {}
    return record_from_state_dict(state)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def reply_duration(devices: Any, model_bytes: int) -> Callable[[Message], float]:
    """Simulated seconds of a train reply (:func:`~fedeq.devices.clock.reply_sim_time` of its metrics and
    tier); 0 for a reply without metrics or tier (the guard rejects it)."""

    def duration(reply: Message) -> float:
        records = list(reply.content.metric_records.values())
        if len(records) != 1 or "tier" not in records[0]:
            return 0.0
        metrics = dict(records[0])
        tier = int(metrics["tier"])  # type: ignore[arg-type]
        if not 0 <= tier < len(devices.tiers):
            return 0.0
        return reply_sim_time(devices.tiers[tier], metrics, model_bytes, devices.nfe_cost_s)

    return duration


def run_server(
    grid: Grid, cfg: Any, out_dir: Path | None = None, quiet: bool = False, resume: bool = False
) -> Path:
    """Run the whole federated training for ``cfg`` over ``grid``; return the output folder.

    After every round the output files and ``checkpoint.pkl`` are rewritten; with ``resume`` the run
    continues after the last checkpointed round of ``out_dir`` with every state restored.
    """
    seed_everything(cfg.seed)
    wait_for_nodes(grid, cfg)  # fewer nodes than the config needs: one line, not a wait forever
    out = Path(out_dir) if out_dir is not None else run_dir(cfg.output_dir, cfg.run_name)
    if not resume:
        check_new_run(out)  # an earlier run's results are never overwritten (flwr run, deployments too)
    config_yaml = to_yaml(cfg)
    recorder = RunRecorder(out, config_yaml)
    tiers = list(cfg.devices.tiers)
    assignment = assign_tiers(cfg)
    sizes = partition_sizes(cfg.data, cfg.num_clients, cfg.seed)
    recorder.save_partitions(sizes, [tiers[i].name for i in assignment])

    splits = client_dataset(cfg.data, cfg.seed)
    device = resolve_device(cfg.train.device)
    if not quiet:
        console.print(f"building the model: {cfg.model.name}", style="dim", soft_wrap=True, highlight=False)
    model = initial_model(cfg, splits.input_shape, splits.num_classes)
    arrays = shared_arrays(cfg, model)
    model_bytes = arrays.count_bytes()
    personalized = cfg.personalization.method != "none"
    global_model = get_method(cfg.personalization.method).shares == "model"
    recorder.extra.update(
        model=cfg.model.name,
        num_parameters=num_parameters(model),
        model_bytes=model_bytes,
        strategy=cfg.strategy.name,
        engine=cfg.engine,
    )

    strategy = strategy_for(cfg)
    attach_server_evaluator(strategy, cfg, model, device)
    devices = attribute_view(cfg.devices)
    if devices.deadline_s is not None and devices.deadline_policy == "drop":
        strategy.reply_checks.append(deadline_check(devices, model_bytes))
    asynchronous = cfg.aggregation == "async"
    book_type = AsyncRoundBook if asynchronous else PersonalRoundBook if personalized else RoundBook
    book = book_type(devices, strategy, model_bytes, recorder, getattr(grid, "node_config", None))
    loop_state = AsyncState(cfg.seed) if asynchronous else None
    if asynchronous:
        recorder.client_columns = ASYNC_CLIENT_COLUMNS
        strategy.reply_checks.append(staleness_check(getattr(cfg, "async").max_staleness))
    if personalized:
        recorder.client_columns = PERSONAL_CLIENT_COLUMNS
        recorder.extra["personalization"] = cfg.personalization.method
    ref = reference_tier(cfg)
    test = (model, splits.x_test, splits.y_test, device)
    curve_settings = {"solver": ref.solver, "tol": cfg.model.tol, "stop_mode": cfg.model.stop_mode}
    checkpointing = Checkpointing(
        out, strategy, recorder, book, loop_state, node_states=getattr(grid, "node_states", None)
    )
    tier_settings = {t.name: tier_deq_settings(cfg, t) for t in tiers}
    # Without a whole global model (personal heads, local training) there is no global test accuracy.
    callbacks: list[RoundCallback] = [
        *([CentralEvaluation(*test, tier_settings, ref.name, recorder)] if global_model else []),
        *([PersonalEvaluation(strategy)] if personalized else []),
        RoundRecords(book),
        *(
            [BudgetCurve(*test, cfg.eval.budgets, curve_settings, cfg.rounds, recorder)]
            if global_model
            else []
        ),
        ResultsWriter(recorder, out),
        *([] if quiet else [ConsoleReport(cfg.rounds, console)]),
        checkpointing,  # last: the checkpoint holds what the others recorded for the round
    ]

    start_round = 1
    if not resume:
        checkpointing.start_fresh()
    else:
        last_round, arrays = checkpointing.resume()
        start_round = last_round + 1
        if not quiet:
            console.print(f"resuming {out} after round {last_round}", soft_wrap=True)

    timeout = cfg.strategy.round_timeout_s or 3600.0
    if loop_state is not None:
        assert isinstance(book, AsyncRoundBook)
        run_async(
            strategy,
            grid,
            arrays,
            cfg.rounds,
            AsyncSettings.from_config(cfg),
            loop_state,
            duration=reply_duration(devices, model_bytes),
            train_config=ConfigRecord({RUN_CONFIG_KEY: config_yaml}),
            callbacks=callbacks,
            on_update=book.set_update,
            overlap=True,
            timeout=timeout,
        )
        return out
    run_rounds(
        strategy,
        grid,
        arrays,
        cfg.rounds,
        start_round=start_round,
        train_config=ConfigRecord({RUN_CONFIG_KEY: config_yaml}),
        evaluate_config=ConfigRecord({RUN_CONFIG_KEY: config_yaml}),
        callbacks=callbacks,
        overlap=True,
        timeout=timeout,
    )
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
