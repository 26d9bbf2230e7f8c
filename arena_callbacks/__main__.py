"""``python -m arena_callbacks``: the same as the ``arena-callbacks`` command."""

import sys

from .cli import main

sys.exit(main())
