"""``python -m stepdiff``: the ``stepdiff`` command ({mod}`stepdiff.cli`)."""

from .cli import main

raise SystemExit(main())
