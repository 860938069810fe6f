"""``python -m diffbatch``: the same as the ``diffbatch`` command."""

from .cli import main

raise SystemExit(main())
