"""One process of the multi-process tests (test_multihost.py): a global 8-device CPU mesh.

    python tests/_multihost_worker.py PROCESS_ID NUM_PROCESSES PORT BACKENDS CASES

BACKENDS: "xla", "pallas" or "xla,pallas"; CASES: indices into CASES below, e.g. "0,2".

Joins a ``jax.distributed`` job on 127.0.0.1:PORT with ``8 / NUM_PROCESSES`` CPU devices of its
own (gloo collectives), then, for each mesh case, runs random serving steps SPMD: every
process drives its own PageAllocators with the same seeded requests, builds the same metadata
and calls ``init_cache`` / ``update`` / ``copy_pages`` / ``gather``; with a page axis each
process passes only its own groups' k/v (``jax.make_array_from_process_local_data``). Each
process checks the shards it holds against the dense numpy oracle of test_cache.py (built on
``kvshard.reference``), then that ``kvshard.distributed.check_consistent`` passes, and that it
names the last process once that process's allocator alone takes one more request. Prints
``OK`` and exits 0, or raises.
"""

from __future__ import annotations

import sys
import threading

PROCESS_ID, NUM_PROCESSES, PORT = (int(a) for a in sys.argv[1:4])
BACKENDS = sys.argv[4].split(",")
CASE_INDICES = [int(i) for i in sys.argv[5].split(",")]  # into CASES

import jax  # noqa: E402  (after reading argv: nothing else here needs it first)

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8 // NUM_PROCESSES)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    f"127.0.0.1:{PORT}", NUM_PROCESSES, PROCESS_ID, initialization_timeout=60
)

import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from test_cache import Oracle  # noqa: E402

import kvshard  # noqa: E402
from kvshard.distributed import AllocatorDivergence, check_consistent  # noqa: E402

SPEC = kvshard.CacheSpec(
    num_layers=2, num_kv_heads=2, head_dim=64, page_size=4, num_pages=8, dtype="float32"
)
TOKENS = 16  # new tokens a step, padded: one jit signature for every step
Q_HEADS = 4  # 2 query heads per KV head
SM_SCALE = SPEC.head_dim**-0.5
STEPS = 4
CASES = [((2, 4), None), ((2, 4), "data"), ((4, 2), "data"), ((8, 1), None)]
# Interpret mode is slow: the Pallas backend runs two of them (replicated heads with one pool;
# split heads with per-process pools).
PALLAS_CASES = [((2, 4), None), ((4, 2), "data")]


def interpret_barriers_per_process() -> None:
    """Sizes Pallas interpret mode's all-device barriers to this process's devices.

    Interpret mode starts and ends every kernel with a ``threading.Barrier`` over all devices
    of the shard_map mesh (jax/_src/pallas/mosaic/interpret/interpret_pallas_call.py), but a
    process only runs the kernels of its own devices: with the mesh spanning processes the
    barrier waits for threads that live in another process, forever. The update kernel makes
    no cross-device DMA, so a barrier over the local devices keeps every ordering it relies on.
    Only for this CPU test; compiled TPU kernels have no such barrier.
    """
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc

    original = ipc._initialize_shared_memory
    local = jax.local_device_count()

    def initialize(token, device_id, num_devices, num_cores_per_device, *, interpret_params):
        out = original(
            token, device_id, num_devices, num_cores_per_device, interpret_params=interpret_params
        )
        with ipc._shared_memory_init_lock:
            memory = ipc._shared_memory
            if memory.barrier.parties != local:
                memory.barrier = threading.Barrier(
                    local, action=ipc._update_clocks_for_global_barrier
                )
                memory.clean_up_barrier = threading.Barrier(local, action=ipc._clear_shared_memory)
        return out

    ipc._initialize_shared_memory = initialize


def small_kernel_blocks() -> None:
    """2 slices a kernel block instead of 64: interpret mode compiles every unrolled DMA into
    host callbacks, ~18 CPU-seconds an executable at 64 (see test_pallas_meshes.py)."""
    import kvshard.kernels.budgets as budgets

    budgets.MAX_SLICES_PER_BLOCK = 2
    assert budgets.default_num_slices_per_block(4, 2, 128, "float32") == 2


def per_host(mesh, x, axis):
    """x: [G, ...] the same on every host; returns the global array built from this host's
    groups only, as a host that computed only its own groups would."""
    sharding = NamedSharding(mesh, P(axis))
    rows = sorted(
        {idx[0].start or 0 for idx in sharding.addressable_devices_indices_map(x.shape).values()}
    )
    block = x.shape[0] // mesh.shape[axis]
    local = np.concatenate([x[r : r + block] for r in rows])
    return jax.make_array_from_process_local_data(sharding, local, x.shape)


def assert_shards(global_array, expected, what, tolerance=0.0):
    """Every shard this process holds equals (within ``tolerance``) the same region of the
    expected numpy array; the other processes' shards are theirs to check."""
    assert global_array.shape == expected.shape, (what, global_array.shape, expected.shape)
    assert not global_array.is_fully_addressable
    for shard in global_array.addressable_shards:
        np.testing.assert_allclose(
            np.asarray(shard.data),
            expected[shard.index],
            rtol=tolerance,
            atol=tolerance,
            err_msg=f"{what} on {shard.device}",
        )


def schedule(rng, allocator, requests):
    """One step of one pool: each of the 2 request rows idles or grows by 1-5 tokens (row 0
    when both would idle); a request that would pass 12 tokens (3 pages) is freed and a new
    one takes its row. Returns (StepMetadata padded to TOKENS tokens, ids, counts)."""
    ids, counts = [], []
    for row in range(2):
        if rng.random() < 0.25 and (row == 0 or ids):
            continue
        n = int(rng.integers(1, 6))
        req = requests[row]
        if req in allocator and allocator.num_tokens(req) + n > 12:
            allocator.free(req)
            requests[row] = req = req + 2
        ids.append(req)
        counts.append(n)
    rows = allocator.allocate_batch(ids, np.array(counts, np.int64))
    step = kvshard.build_step(allocator, ids, counts, num_tokens_padded=TOKENS, rows=rows)
    return step, ids, counts


def expected_attention(oracle, allocator, layer, group, q, ids, counts):
    """The float64 oracle's attention output [TOKENS, Q_HEADS, D] of one pool's step."""
    keys, values = [], []
    for req in ids:
        pages = np.asarray(allocator.pages(req))
        slots = (pages[:, None] * SPEC.page_size + np.arange(SPEC.page_size)).ravel()
        slots = slots[: allocator.num_tokens(req)]
        keys.append(oracle.k[layer, group, slots])
        values.append(oracle.v[layer, group, slots])
    return kvshard.reference.paged_attention(q, keys, values, counts, sm_scale=SM_SCALE)


def random_tokens(rng, groups, heads):
    shape = (groups, TOKENS, heads, SPEC.head_dim)
    return rng.standard_normal(shape).astype(np.float32)


def run_case(shape, page_axis, backend, seed):
    axis_types = (AxisType.Explicit,) * 2
    mesh = jax.make_mesh(shape, ("data", "model"), axis_types=axis_types)
    assert mesh.devices.size == 8 and not NamedSharding(mesh, P()).is_fully_addressable
    groups = shape[0] if page_axis else 1
    pooled = page_axis is not None
    cache = kvshard.init_cache(SPEC, mesh, page_axis=page_axis)
    oracle = Oracle(SPEC, groups)
    # The same seed on every process: the SPMD scheduler.
    rng = np.random.default_rng(seed)
    allocators = [
        kvshard.PageAllocator(
            SPEC.num_pages, SPEC.page_size, max_requests=3, max_pages_per_request=3
        )
        for _ in range(groups)
    ]
    requests = [[0, 1] for _ in range(groups)]
    for step in range(STEPS):
        scheduled = [schedule(rng, a, r) for a, r in zip(allocators, requests, strict=True)]
        steps = [step for step, _, _ in scheduled]
        k, v = (
            random_tokens(rng, groups, SPEC.num_kv_heads),
            random_tokens(rng, groups, SPEC.num_kv_heads),
        )
        q = random_tokens(rng, groups, Q_HEADS)
        layer = int(rng.integers(SPEC.num_layers))
        oracle.update(
            layer,
            k,
            v,
            np.stack([s.slices for s in steps]),
            np.stack([s.num_slices for s in steps]),
            pooled=True,
        )
        if pooled:
            # Each host passes only its own groups' k, v and q, and (so both paths run) the
            # metadata as numpy on even steps and as per-host global arrays on odd ones.
            meta = kvshard.stack_steps(steps)
            if step % 2:
                meta = jax.tree.map(lambda x: per_host(mesh, x, page_axis), meta)
            k, v, q_in = (per_host(mesh, x, page_axis) for x in (k, v, q))
        else:
            meta, k, v, q_in = steps[0], k[0], v[0], q[0]
        cache = kvshard.update(cache, layer, k, v, meta, backend=backend)
        out = kvshard.attention(cache, layer, q_in, meta, sm_scale=SM_SCALE, backend="xla")
        expected = np.stack(
            [
                expected_attention(oracle, allocators[g], layer, g, q[g], ids, counts)
                for g, (_, ids, counts) in enumerate(scheduled)
            ]
        )
        assert_shards(out, expected if pooled else expected[0], "attention", tolerance=2e-5)
        # Copy page 1 to a random other page in every pool (all layers, all heads): the
        # allocator's copy-on-write path, with the oracle following.
        dst = int(rng.integers(2, SPEC.num_pages))
        pairs = np.array([[1, dst], [0, 0]], np.int32)
        cache = kvshard.copy_pages(cache, np.stack([pairs] * groups) if pooled else pairs)
        for dense in (oracle.k, oracle.v):
            page = slice(dst * SPEC.page_size, (dst + 1) * SPEC.page_size)
            dense[:, :, page] = dense[:, :, SPEC.page_size : 2 * SPEC.page_size]
    assert_shards(cache.kv, oracle.raw(cache.replication), "kv")
    slots = np.arange(SPEC.slots_per_pool, dtype=np.int32)
    for layer in range(SPEC.num_layers):
        k, v = kvshard.gather(cache, layer, np.stack([slots] * groups) if pooled else slots)
        expected_k, expected_v = oracle.k[layer], oracle.v[layer]
        if not pooled:
            expected_k, expected_v = expected_k[0], expected_v[0]
        assert_shards(k, expected_k, "gathered k")
        assert_shards(v, expected_v, "gathered v")
    return allocators


def main():
    assert jax.process_count() == NUM_PROCESSES and jax.device_count() == 8
    if "pallas" in BACKENDS:
        interpret_barriers_per_process()
        small_kernel_blocks()
    allocators = []
    for i in CASE_INDICES:
        shape, page_axis = CASES[i]
        for backend in BACKENDS:
            if backend == "pallas" and (shape, page_axis) not in PALLAS_CASES:
                continue
            allocators = run_case(shape, page_axis, backend, seed=i)
            print(f"process {PROCESS_ID}: {shape} page_axis={page_axis} {backend} ok", flush=True)
    check_consistent(allocators)
    if PROCESS_ID == NUM_PROCESSES - 1:  # one host's scheduler takes a request the others did not
        allocators[0].allocate("only-on-the-last-host", 1)
    try:
        check_consistent(allocators)
    except AllocatorDivergence as err:
        assert err.processes == [NUM_PROCESSES - 1], err.processes
        assert f"processes [{NUM_PROCESSES - 1}]" in str(err), str(err)
    else:
        raise AssertionError("check_consistent missed a diverged allocator")
    print(f"process {PROCESS_ID}: OK", flush=True)


if __name__ == "__main__":
    main()
