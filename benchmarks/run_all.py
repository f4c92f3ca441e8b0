"""Source-tree shortcut: ``python benchmarks/run_all.py ARGS`` runs the whole suite,
``python -m kvshard.benchmarks ARGS`` (= ``kvshard bench ARGS``)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # this checkout's kvshard

from kvshard.benchmarks.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
