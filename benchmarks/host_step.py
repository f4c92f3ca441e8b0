"""Source-tree shortcut: ``python benchmarks/host_step.py ARGS`` runs
``python -m kvshard.benchmarks.host_step ARGS`` (the code ships in the package)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # this checkout's kvshard

from kvshard.benchmarks.host_step import main

if __name__ == "__main__":
    main()
