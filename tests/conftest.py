"""Test-session settings: one torch thread in the test process.

The models under test are small (tiny matmuls gain nothing from threads), and end-to-end tests run Ray actors
or Flower processes beside the test process, so more threads only oversubscribe the cores.
"""

from collections.abc import Iterator

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    """A local Ray cluster with 4 logical CPUs for the module's tests (shut down after, if started here)."""
    import ray

    from fedeq.engines.ray.grid import start_ray

    started = not ray.is_initialized()
    start_ray(num_cpus=4)
    yield
    if started:
        ray.shutdown()
