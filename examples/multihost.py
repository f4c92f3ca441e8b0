"""Serves requests with kvshard on a mesh that spans several JAX processes, as on a pod slice.

One command starts N local processes (a ``jax.distributed`` job on 127.0.0.1, gloo
collectives, 8 / N CPU devices each) that together form one (data, model) mesh of 8 devices::

    python examples/multihost.py                  # 2 processes x 4 CPU devices, mesh 2x4
    python examples/multihost.py --processes 4    # 4 processes x 2 CPU devices

On a TPU pod slice, run the same file once per host with ``--pod`` (JAX finds the
coordinator, the process count and the process id itself); see docs/guides/multihost.md.

Every process runs the same scheduler on the same requests (SPMD): one
:class:`kvshard.Scheduler` and its PageAllocator per page pool (data-parallel group), the same
``StepMetadata`` every step. Each process computes k, v
and q only for the groups its devices hold and hands them to JAX with
``jax.make_array_from_process_local_data``; replicated metadata goes in as numpy, the same on
every host. Each step writes the new tokens (``kvshard.update``) and attends
(``kvshard.attention``); each process checks the attention rows it holds against
``kvshard.reference.paged_attention`` and, every few steps, that all processes' allocators
agree (``kvshard.distributed.check_consistent``). Exits non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

if "--pod" not in sys.argv:  # CPU simulation; on a pod slice JAX finds the TPUs
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("NPROC", "16")  # XLA CPU threads >= devices (interpret mode)

GLOBAL_CPU_DEVICES = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--processes", type=int, default=2, help="local processes (divides 8)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--data", type=int, default=2, help="page pools: size of the 'data' axis")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds, local launch only")
    p.add_argument("--pod", action="store_true", help="one process per TPU host")
    p.add_argument(
        "--worker", nargs=3, type=int, metavar=("ID", "N", "PORT"), help=argparse.SUPPRESS
    )
    args = p.parse_args(argv)
    if args.processes < 1 or GLOBAL_CPU_DEVICES % args.processes:
        p.error(f"--processes={args.processes} must divide {GLOBAL_CPU_DEVICES}")
    return args


# --------------------------------------------------------------------------------------------
# The launcher: N copies of this script, every one killed on the way out
# --------------------------------------------------------------------------------------------


def launch(args: argparse.Namespace) -> int:
    with socket.socket() as s:  # a free port, picked now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Each process asks for its share of the devices itself (join); other XLA flags pass on.
    env = dict(os.environ)
    xla_flags = [f for f in env.pop("XLA_FLAGS", "").split() if "device_count" not in f]
    if xla_flags:
        env["XLA_FLAGS"] = " ".join(xla_flags)
    flags = ["--steps", str(args.steps), "--data", str(args.data)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *flags, "--worker", str(i), str(args.processes), str(port)],
            env=env,
            start_new_session=True,
        )
        for i in range(args.processes)
    ]
    deadline = time.monotonic() + args.timeout
    try:
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.1)
    finally:
        for p in procs:  # a failed process leaves the others waiting in a collective
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        print(f"processes {failed} failed or were stopped", file=sys.stderr)
        return 1
    print(f"all {args.processes} processes agree and match the oracle")
    return 0


# --------------------------------------------------------------------------------------------
# One process
# --------------------------------------------------------------------------------------------


def join(args: argparse.Namespace) -> None:
    import jax

    if args.pod:
        jax.distributed.initialize()  # TPU pod slice: everything from the TPU environment
        return
    pid, n, port = args.worker
    jax.config.update("jax_num_cpu_devices", GLOBAL_CPU_DEVICES // n)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", n, pid, initialization_timeout=60)


def serve(args: argparse.Namespace) -> None:
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import kvshard

    me, say = jax.process_index(), print if jax.process_index() == 0 else (lambda *a: None)
    mesh = jax.make_mesh((args.data, jax.device_count() // args.data), ("data", "model"))
    spec = kvshard.CacheSpec(
        num_layers=2, num_kv_heads=4, head_dim=64, page_size=4, num_pages=16, dtype="float32"
    )
    q_heads, vocab, tokens = 8, 64, 32
    cache = kvshard.init_cache(spec, mesh, page_axis="data")
    say(
        f"{jax.process_count()} processes, {jax.device_count()} devices, mesh {dict(mesh.shape)};"
        f" process 0 holds {jax.local_device_count()} devices"
    )

    # The "model": k, v, q of a token are fixed random rows, the same table on every host.
    table = np.random.default_rng(0).standard_normal((3, vocab, q_heads, spec.head_dim))
    table = table.astype(np.float32)

    # Which page pools this process's devices hold: it computes activations for those only.
    pools = NamedSharding(mesh, P("data"))
    index = pools.addressable_devices_indices_map((args.data,))
    mine = sorted({s[0].start or 0 for s in index.values()})

    # The SPMD scheduler: the same seeded requests on every host, one kvshard.Scheduler (and
    # its PageAllocator) per pool; the "sampled" tokens are seeded random ids, the same on
    # every host, so every host's schedulers make the same decisions.
    rng = np.random.default_rng(1)
    allocators = [
        kvshard.PageAllocator(
            spec.num_pages, spec.page_size, max_requests=4, max_pages_per_request=6
        )
        for _ in range(args.data)
    ]
    config = kvshard.SchedulerConfig(
        max_num_batched_tokens=tokens, max_num_seqs=4, token_buckets=(tokens,)
    )
    schedulers = [kvshard.Scheduler(alloc, config) for alloc in allocators]
    history = [dict() for _ in range(args.data)]  # request -> its token ids so far
    next_id = [0] * args.data
    worst = 0.0
    for step in range(args.steps):
        steps, batches, outs = [], [], []
        for g, scheduler in enumerate(schedulers):
            if scheduler.num_running + scheduler.num_waiting < 2:  # admit a new request
                prompt = rng.integers(vocab, size=int(rng.integers(3, 9))).tolist()
                history[g][next_id[g]] = prompt
                scheduler.add_request(
                    kvshard.GenerationRequest(next_id[g], prompt, max_new_tokens=12 - len(prompt))
                )
                next_id[g] += 1
            out = scheduler.schedule()
            ids = [r for r, _ in out.seq_ids]
            counts = out.num_scheduled_tokens.tolist()
            # The tokens whose K/V this step writes end at position + count in each request.
            ends = [
                int(out.step.positions[out.step.cu_q_lens[i + 1] - 1]) + 1 for i in range(len(ids))
            ]
            steps.append(out.step)
            batches.append((ids, counts, ends))
            outs.append(out)
        meta = kvshard.stack_steps(steps)

        # Activations [data, T, heads, D]; each host computes only its own pools' rows and
        # hands JAX that block (its pools are contiguous along "data").
        heads = (q_heads, spec.num_kv_heads, spec.num_kv_heads)
        act = [np.zeros((args.data, tokens, h, spec.head_dim), np.float32) for h in heads]
        for g in mine:
            new = outs[g].token_ids[: sum(batches[g][1])].tolist()
            for a, rows, h in zip(act, table, heads, strict=True):
                a[g, : len(new)] = rows[new][:, :h]
        q, k, v = (
            jax.make_array_from_process_local_data(pools, a[mine[0] : mine[-1] + 1], a.shape)
            for a in act
        )
        for layer in range(spec.num_layers):
            cache = kvshard.update(cache, layer, k, v, meta)
            out = kvshard.attention(cache, layer, q, meta, sm_scale=spec.head_dim**-0.5)
        for shard in out.addressable_shards:  # check what this process holds
            g = shard.index[0].start or 0
            ids, counts, ends = batches[g]
            if not ids:
                continue
            seen = [history[g][r][:e] for r, e in zip(ids, ends, strict=True)]
            keys = [table[1][s][:, : spec.num_kv_heads] for s in seen]
            vals = [table[2][s][:, : spec.num_kv_heads] for s in seen]
            ref = kvshard.reference.paged_attention(
                table[0][outs[g].token_ids[: sum(counts)]],
                keys,
                vals,
                counts,
                sm_scale=spec.head_dim**-0.5,
            )
            full = np.zeros((tokens, q_heads, spec.head_dim))
            full[: len(ref)] = ref
            got = np.asarray(shard.data)[0]
            diff = float(np.abs(got - full[shard.index[1:]]).max())
            worst = max(worst, diff)
            if diff > 1e-4:
                raise SystemExit(f"process {me}: step {step} pool {g}: attention differs by {diff}")
        for g, (scheduler, out) in enumerate(zip(schedulers, outs, strict=True)):
            sampled = rng.integers(vocab, size=len(out.sample_seq_ids)).tolist()
            for (r, _), t in zip(out.sample_seq_ids, sampled, strict=True):
                history[g][r].append(t)
            for done in scheduler.update(out, sampled):
                del history[g][done.req_id]
        if step % 4 == 3 or step == args.steps - 1:
            kvshard.distributed.check_consistent(allocators)
        say(
            f"step {step}: {sum(sum(b[1]) for b in batches)} tokens, pages used "
            f"{[spec.num_pages - 1 - a.num_free_pages for a in allocators]}"
        )
    print(f"process {me}: {args.steps} steps, max abs diff vs reference {worst:.2e}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.pod and args.worker is None:
        return launch(args)
    join(args)
    serve(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
