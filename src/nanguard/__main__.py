"""``python -m nanguard`` is the same program as the ``nanguard`` command."""

from nanguard.cli import main

raise SystemExit(main())
