"""``python -m fedeq.cli``: the ``fedeq`` command."""

from fedeq.cli.main import main

raise SystemExit(main())
