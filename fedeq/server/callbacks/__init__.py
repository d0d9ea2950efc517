"""Callbacks of the server's round loop, one concern each.

- :class:`RoundCallback` (:mod:`.base`): the hooks, each a no-op by default;
- :class:`CentralEvaluation`, :class:`BudgetCurve` (:mod:`.evaluation`): the global model on the test split;
- :class:`RoundRecords`, :class:`ResultsWriter` (:mod:`.results`): ``rounds.csv``/``clients.csv`` rows and
  the output folder;
- :class:`PersonalEvaluation` (:mod:`.personal`): the clients' personalised accuracy;
- :class:`ConsoleReport` (:mod:`.console`): one line per round;
- :class:`Checkpointing` (:mod:`.checkpoint`): ``checkpoint.pkl`` + journal, and resuming from them.
"""

from fedeq.server.callbacks.base import RoundCallback
from fedeq.server.callbacks.checkpoint import Checkpointing
from fedeq.server.callbacks.console import ConsoleReport
from fedeq.server.callbacks.evaluation import BudgetCurve, CentralEvaluation
from fedeq.server.callbacks.personal import PersonalEvaluation
from fedeq.server.callbacks.results import ResultsWriter, RoundRecords

__all__ = [
    "BudgetCurve",
    "CentralEvaluation",
    "Checkpointing",
    "ConsoleReport",
    "PersonalEvaluation",
    "ResultsWriter",
    "RoundCallback",
    "RoundRecords",
]
