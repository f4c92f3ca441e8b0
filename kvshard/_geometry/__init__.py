"""JAX-free geometry and configuration: cache layouts and their bytes, layer types and
their groups, the Hugging Face config reader (the state layers of hybrid models too), the int32
bounds, and the planner.

Importing this package never imports JAX (``kvshard plan`` runs without it). Its modules are
imported by path; this ``__init__`` re-exports nothing.
"""
