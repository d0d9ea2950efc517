"""Engines that run a validated config, registered by name in :data:`fedeq.registry.ENGINES`.

Importing this package registers the built-ins (``ray``, then ``flower``: the order of the names) without
importing Ray or Flower: each engine imports its runtime when it runs.
"""

from fedeq.engines.base import Engine, get_engine, resumable_engines, resume_refused
from fedeq.engines.ray import RayEngine

# isort: split
from fedeq.engines.flower import FlowerEngine

__all__ = ["Engine", "FlowerEngine", "RayEngine", "get_engine", "resumable_engines", "resume_refused"]
