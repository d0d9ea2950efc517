"""``python -m fedeq.cli``: the ``fedeq`` command."""

from fedeq.cli.main import run_command

raise SystemExit(run_command())
