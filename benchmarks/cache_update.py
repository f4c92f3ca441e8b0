"""Source-tree shortcut: ``python benchmarks/cache_update.py ARGS`` runs
``python -m kvshard.benchmarks.cache_update ARGS`` (= ``kvshard bench-cache ARGS``)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # this checkout's kvshard

from kvshard.benchmarks.cache_update import main

if __name__ == "__main__":
    main()
