"""Personalised federated learning: personal parts kept on each client, shared parts averaged
(docs/personalization.md). Importing this package registers the built-in methods."""

from fedeq.personal.methods import LocalJob, PersonalMethod, admm_dual_step, combine_stats, get_method
from fedeq.personal.split import default_personal_modules, personal_keys, select, trainable_only
from fedeq.personal.state import PersonalState
from fedeq.personal.summary import personal_summary

__all__ = [
    "LocalJob",
    "PersonalMethod",
    "PersonalState",
    "admm_dual_step",
    "combine_stats",
    "default_personal_modules",
    "get_method",
    "personal_keys",
    "personal_summary",
    "select",
    "trainable_only",
]
