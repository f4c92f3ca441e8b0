"""Device plumbing every operation shares: argument checks before a device call, backend
options and the platform's backend, sharding and placement, storage dtypes and K/V rows, the
drop rule and ``checks=True`` reports inside jit, the call memo, and JAX version differences.

Its modules are imported by path; this ``__init__`` re-exports nothing.
"""
