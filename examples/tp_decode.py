"""Serves a small GQA transformer with continuous batching on 8 CPU devices, tensor parallel.

The program lives in the package, ``kvshard/_demo/`` (so that ``kvshard demo`` works after a
plain ``pip install``); this file runs it from a checkout:

    python examples/tp_decode.py [ARGS]      # the same as: kvshard demo [ARGS]

See ``kvshard demo --help`` for the arguments and :mod:`kvshard._demo.tp_decode` for what it
does (every step's logits checked against a dense float64 model; exit 1 past 1e-4).
"""

import sys

# Importing the demo sets its simulated-device flags before it imports JAX.
from kvshard._demo.tp_decode import main

if __name__ == "__main__":
    sys.exit(main())
