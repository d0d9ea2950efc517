"""The federated round loop (the same steps as ``flwr.serverapp.strategy.Strategy.start``), resumable.

Per round: ``configure_train`` → ``grid.send_and_receive`` → ``aggregate_train`` → ``configure_evaluate`` →
``send_and_receive`` → ``aggregate_evaluate`` → central ``evaluate_fn`` → ``on_round_end`` (checkpoint).
Starting at ``start_round > 1`` continues a run from a checkpoint with the strategy's state restored.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy


def run_rounds(
    strategy: Strategy,
    grid: Grid,
    arrays: ArrayRecord,
    num_rounds: int,
    *,
    start_round: int = 1,
    train_config: ConfigRecord | None = None,
    evaluate_config: ConfigRecord | None = None,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    on_round_end: Callable[[int, ArrayRecord], None] | None = None,
    timeout: float = 3600.0,
) -> Result:
    """Run rounds ``start_round..num_rounds``; return Flower's ``Result`` for them."""
    train_config = ConfigRecord() if train_config is None else train_config
    evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
    result = Result(arrays=arrays)
    if evaluate_fn is not None and start_round == 1:
        res = evaluate_fn(0, arrays)
        if res is not None:
            result.evaluate_metrics_serverapp[0] = res
    for rnd in range(start_round, num_rounds + 1):
        replies = grid.send_and_receive(
            strategy.configure_train(rnd, arrays, train_config, grid), timeout=timeout
        )
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
        if evaluate_fn is not None:
            res = evaluate_fn(rnd, arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[rnd] = res
        if on_round_end is not None:
            on_round_end(rnd, arrays)
    return result
