"""Source-tree shortcut: ``python benchmarks/allocator_latency.py ARGS`` runs
``python -m kvshard.benchmarks.allocator_latency ARGS`` (the code ships in the package)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # this checkout's kvshard

from kvshard.benchmarks.allocator_latency import main

if __name__ == "__main__":
    main()
