"""The federated round loop (the same steps as ``flwr.serverapp.strategy.Strategy.start``), resumable.

Per round: ``configure_train`` → ``grid.send_and_receive`` → ``aggregate_train`` → ``configure_evaluate`` →
``send_and_receive`` → ``aggregate_evaluate`` → every callback's ``on_round_end`` → every callback's
``after_round`` (central evaluation, results, checkpoint, ...: see :mod:`fedeq.server.callbacks`).

With ``overlap=True`` the ``after_round`` hooks of round ``k`` run in a background thread while round
``k + 1`` trains: the next round's model is already known once round ``k`` is aggregated, so the server's
evaluation need not hold the clients up. The thread is joined before round ``k + 1`` is aggregated, so the
strategy is never touched by two threads at once, and before the loop returns. ``on_round_end`` runs in the
calling thread right after the aggregation, so whatever it captures (strategy state, RNG states) is the
state at the end of round ``k`` in both modes.

Starting at ``start_round > 1`` continues a run from a checkpoint with the strategy's state restored.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedeq.server.callbacks.base import RoundCallback

__all__ = ["run_rounds"]


def run_rounds(
    strategy: Strategy,
    grid: Grid,
    arrays: ArrayRecord,
    num_rounds: int,
    *,
    start_round: int = 1,
    train_config: ConfigRecord | None = None,
    evaluate_config: ConfigRecord | None = None,
    callbacks: Sequence[RoundCallback] = (),
    overlap: bool = False,
    timeout: float = 3600.0,
) -> Result:
    """Run rounds ``start_round..num_rounds``; return Flower's ``Result`` for them.

    The numbers the callbacks' ``after_round`` return for a round are its ``evaluate_metrics_serverapp``.
    """
    train_config = ConfigRecord() if train_config is None else train_config
    evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
    result = Result(arrays=arrays)

    def finish_round(rnd: int, round_arrays: ArrayRecord) -> None:
        metrics: dict[str, Any] = {}
        for callback in callbacks:
            metrics.update(callback.after_round(rnd, round_arrays, metrics) or {})
        numbers = {k: v for k, v in metrics.items() if type(v) in (int, float)}
        if numbers:
            result.evaluate_metrics_serverapp[rnd] = MetricRecord(numbers)

    for callback in callbacks:
        callback.on_run_start(start_round, arrays)
    if start_round == 1:
        finish_round(0, arrays)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedeq-round-end") as pool:
        pending: Future[None] | None = None
        for rnd in range(start_round, num_rounds + 1):
            replies = grid.send_and_receive(
                strategy.configure_train(rnd, arrays, train_config, grid), timeout=timeout
            )
            if pending is not None:
                pending.result()  # the previous round's callbacks; re-raises their error
            new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
            if new_arrays is not None:
                arrays = result.arrays = new_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[rnd] = train_metrics
            replies = grid.send_and_receive(
                strategy.configure_evaluate(rnd, arrays, evaluate_config, grid), timeout=timeout
            )
            eval_metrics = strategy.aggregate_evaluate(rnd, replies)
            if eval_metrics is not None:
                result.evaluate_metrics_clientapp[rnd] = eval_metrics
            for callback in callbacks:
                callback.on_round_end(rnd, arrays)
            if overlap and rnd < num_rounds:
                pending = pool.submit(finish_round, rnd, arrays)
            else:
                pending = None
                finish_round(rnd, arrays)
    for callback in callbacks:
        callback.on_run_end(result)
    return result
