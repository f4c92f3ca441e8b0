"""kvshard's benchmark suite, shipped with the package: ``kvshard bench`` runs it.

Each benchmark prints a table and writes ``<name>.json`` and ``<name>.png`` (matplotlib, when
installed) to the results folder; every comparison is measured side by side in one run.

- :mod:`~kvshard.benchmarks.host_step`: allocator + metadata vs a per-request-loop baseline,
  decode and mixed batches, swept over B;
- :mod:`~kvshard.benchmarks.allocator_latency`: allocate/free percentiles, free stack vs evicting;
- :mod:`~kvshard.benchmarks.cache_update`: ``kvshard.update`` donated vs undonated vs a copy of
  the same bytes, per dtype and token count;
- :mod:`~kvshard.benchmarks.compilations`: XLA compilations over a random serving trace;
- :mod:`~kvshard.benchmarks.memory`: compiled temporaries of the update per dtype, the
  allocator's host memory;
- :mod:`~kvshard.benchmarks.attention_decode`: ``kvshard.attention`` vs ``kvshard.gather`` +
  dense attention for a decode step, time and compiled temporaries;
- :mod:`~kvshard.benchmarks.attention_prefill`: ``kvshard.attention`` (xla) vs dense attention
  on contiguous K/V vs gather + dense for prompts of 128 to 8k tokens, interleaved rounds, and
  compiled temporaries;
- :mod:`~kvshard.benchmarks.tpu_schedule`: the TPU kernel's DMAs and waits on paper;
- :mod:`~kvshard.benchmarks.update_schedules`: the update kernel's two DMA schedules checked
  against the oracle and timed (on a chip: ``kvshard bench-schedules``);
- :mod:`~kvshard.benchmarks.attention_kernels`: kvshard's Pallas attention kernel vs JAX's,
  checked against the kernel's reference and timed (JAX's runs on a TPU only).

Every benchmark calls kvshard through its public API, inside the caller's own ``jax.jit`` where
a serving loop would jit (memory figures: ``jax.jit(...).lower(...).compile()
.memory_analysis()``).

Run ``python -m kvshard.benchmarks --help`` (or ``kvshard bench --help``).
"""
