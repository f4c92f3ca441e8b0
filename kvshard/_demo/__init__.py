"""The demo behind ``kvshard demo``: a small GQA transformer served from a kvshard cache.

Shipped in the package (not only in the repository's ``examples/``) so that ``kvshard demo``
works after a plain ``pip install``. :mod:`kvshard._demo.model` holds the model, its dense
float64 oracle and the continuous-batching engine; :mod:`kvshard._demo.tp_decode` is the
program (``examples/tp_decode.py`` and ``examples/prefix_sharing.py`` use them). Private: not
part of the API. Importing this package imports nothing else; the modules import JAX.
"""
