"""``python -m kvshard``: the ``kvshard`` command (see :mod:`kvshard.cli`)."""

import sys

from kvshard.cli import main

sys.exit(main())
