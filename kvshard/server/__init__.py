"""``kvshard serve``: a checkpoint served over HTTP with continuous batching (needs the ``serve``
extra for the HTTP part).

* :mod:`~kvshard.server.sampling`: greedy, temperature, top-k and top-p sampling in ``jnp``,
  seeded per request;
* :mod:`~kvshard.server.engine`: :class:`~kvshard.server.engine.Engine`, the template's model
  (:mod:`kvshard.models`) under :class:`kvshard.Scheduler`, one step at a time;
* :mod:`~kvshard.server.loop`: the engine in one background thread behind a command queue;
* :mod:`~kvshard.server.app`: the Starlette application (OpenAI completions, health, models,
  Prometheus metrics);
* :mod:`~kvshard.server.main`: the ``kvshard serve`` command line.
"""
