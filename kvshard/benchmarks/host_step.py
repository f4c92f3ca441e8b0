"""Host cost of one serving step: page allocation + update-slice metadata + padding.

Compares kvshard (``PageAllocator.allocate_batch`` + ``build_update_slices`` + ``pad_slices``)
with a baseline written here that follows vLLM's TPU runner: a per-request Python loop to grow
each request's block list, and ``_get_slot_mapping_metadata`` (a per-request loop plus a list
of ``arange`` slices). Both run side by side in one process on the same state.

Usage::

    python -m kvshard.benchmarks.host_step               # B = 256, 1024, 4096 (the table)
    python -m kvshard.benchmarks.host_step --batch-sizes 1024 --repeats 50
    python -m kvshard.benchmarks --only host_step        # the sweep over B, JSON + plot

Times are the minimum (and median) over ``--repeats`` runs of one step, in microseconds.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from kvshard.allocator import PageAllocator
from kvshard.benchmarks._common import machine, pyplot, save_figure, timed, write_json, wrote
from kvshard.metadata import build_update_slices, pad_slices, token_buckets

# ------------------------------------------------------------------ the baseline


def vllm_slot_mapping(
    num_computed: np.ndarray, num_scheduled: np.ndarray, block_table: np.ndarray, page_size: int
) -> np.ndarray:
    """vLLM TPU runner's ``_get_slot_mapping_metadata`` (numpy + per-request loop): int[S, 3]."""
    num_reqs = num_scheduled.shape[0]
    max_blocks = block_table.shape[1]
    arange = np.arange(max(max_blocks, 1) + 1, dtype=np.int32)
    slices_start = num_computed[:num_reqs]
    slices_end = num_computed[:num_reqs] + num_scheduled
    local_block_start_idx = slices_start // page_size
    local_block_end_idx = (slices_end - 1) // page_size
    no_repeat_req_indices = np.arange(num_reqs)
    global_block_start_idx = no_repeat_req_indices * max_blocks + local_block_start_idx
    block_lens = local_block_end_idx - local_block_start_idx + 1
    global_block_start_idx = np.repeat(global_block_start_idx, block_lens)
    slice_arange = np.concatenate([arange[:n] for n in block_lens])
    global_block_indices = global_block_start_idx + slice_arange
    block_numbers = block_table.reshape(-1)[global_block_indices]  # torch flatten is a view
    total_block_len = np.sum(block_lens)
    slot_mapping_slices = np.repeat(
        np.array([[0, page_size]], dtype=np.int32), total_block_len, axis=0
    )
    cu_block_lens = np.zeros(len(block_lens) + 1, dtype=np.int32)
    np.cumsum(block_lens, out=cu_block_lens[1:])
    for req_idx in range(num_reqs):
        slot_mapping_slices[cu_block_lens[req_idx]][0] = slices_start[req_idx] % page_size
        slot_mapping_slices[cu_block_lens[req_idx + 1] - 1][1] = (
            slices_end[req_idx] - 1
        ) % page_size + 1
    slice_lens = slot_mapping_slices[:, 1] - slot_mapping_slices[:, 0]
    cu_slices_lens = np.zeros(len(slice_lens) + 1, dtype=np.int32)
    np.cumsum(slice_lens, out=cu_slices_lens[1:])
    kv_cache_start_indices = slot_mapping_slices[:, 0] + (block_numbers * page_size)
    new_kv_start_indices = cu_slices_lens[:-1]
    return np.stack([kv_cache_start_indices, new_kv_start_indices, slice_lens], axis=1)


class LoopAllocator:
    """Baseline allocator: Python free list, per-request block lists, a numpy block table."""

    def __init__(self, num_pages: int, page_size: int, max_reqs: int, max_pages: int) -> None:
        self.page_size = page_size
        self.free = list(range(num_pages - 1, 0, -1))
        self.blocks: dict[int, list[int]] = {}
        self.tokens: dict[int, int] = {}
        self.table = np.zeros((max_reqs, max_pages), np.int32)

    def allocate(self, req: int, n: int) -> None:
        blocks = self.blocks.setdefault(req, [])
        total = self.tokens.get(req, 0) + n
        need = -(-total // self.page_size) - len(blocks)
        if need > len(self.free):
            raise RuntimeError("out of pages")
        for _ in range(need):
            page = self.free.pop()
            self.table[req, len(blocks)] = page
            blocks.append(page)
        self.tokens[req] = total

    def free_req(self, req: int) -> None:
        self.free.extend(reversed(self.blocks.pop(req)))
        self.table[req] = 0
        del self.tokens[req]


# ------------------------------------------------------------------ scenario


class Scenario:
    """B decoding requests holding ``context`` ± tokens, plus optional new prefills per step."""

    def __init__(self, args: argparse.Namespace, batch: int, prefills: int) -> None:
        self.P = args.page_size
        self.batch, self.prefills, self.chunk = batch, prefills, args.prefill_chunk
        steps = 4 * args.repeats + 8  # every timed or warm-up step grows each request once
        max_pages = (args.context + steps + self.chunk) // self.P + 2
        num_reqs = batch + prefills
        num_pages = num_reqs * max_pages + 1
        rng = np.random.default_rng(0)
        self.ctx = rng.integers(args.context // 2, args.context + 1, size=batch)
        self.kv = PageAllocator(
            num_pages, self.P, max_requests=num_reqs, max_pages_per_request=max_pages
        )
        self.ids = list(range(batch))
        self.kv.allocate_batch(self.ids, self.ctx)
        self.base = LoopAllocator(num_pages, self.P, num_reqs, max_pages)
        for req, n in enumerate(self.ctx.tolist()):
            self.base.allocate(req, n)
        self.new_ids = list(range(batch, batch + prefills))
        self.step_ids = self.ids + self.new_ids
        self.counts = np.array([1] * batch + [self.chunk] * prefills, np.int64)
        self.num_tokens = int(self.counts.sum())
        self.buckets = token_buckets(16, max(self.num_tokens, 16))
        self.max_num_seqs = num_reqs

    def reset(self) -> None:
        """Drops the previous step's prefill requests, so every step admits new ones."""
        for req in self.new_ids:
            if req in self.kv:
                self.kv.free(req)
            if req in self.base.blocks:
                self.base.free_req(req)

    def kvshard_step(self) -> np.ndarray:
        kv = self.kv
        rows = kv.allocate_batch(self.step_ids, self.counts)
        computed = kv.row_num_tokens[rows] - self.counts
        slices = build_update_slices(computed, self.counts, kv.page_table, self.P, rows=rows)
        padded, _, _ = pad_slices(
            slices,
            self.num_tokens,
            max_num_seqs=self.max_num_seqs,
            page_size=self.P,
            buckets=self.buckets,
        )
        return padded

    def baseline_step(self) -> np.ndarray:
        base = self.base
        computed = np.empty(len(self.step_ids), np.int64)
        for i, (req, n) in enumerate(zip(self.step_ids, self.counts.tolist(), strict=True)):
            computed[i] = base.tokens.get(req, 0)
            base.allocate(req, n)
        meta = vllm_slot_mapping(computed, self.counts, base.table[: len(self.step_ids)], self.P)
        size = min(2 * self.max_num_seqs + self.buckets[-1] // self.P, self.buckets[-1])
        return np.pad(meta, [[0, size - len(meta)], [0, 0]]).T

    def metadata_inputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A decode-only step's inputs, in batch order (rows of kvshard's table are 0..B-1)."""
        ones = np.ones(self.batch, np.int64)
        return self.kv.row_num_tokens[: self.batch].copy(), ones, self.kv.page_table[: self.batch]


def measure_decode(args: argparse.Namespace, batch: int) -> dict[str, tuple]:
    """Times one decode step of ``batch`` requests, kvshard and baseline side by side.

    Returns ``{"metadata": (ours, theirs), "host step": (ours, theirs)}``, each time a
    ``(min, median)`` pair in seconds. Checks first that both build the same slices.
    """
    sc = Scenario(args, batch, prefills=0)
    computed, ones, table = sc.metadata_inputs()
    got = build_update_slices(computed, ones, table, sc.P)
    want = vllm_slot_mapping(computed, ones, table, sc.P).T
    assert np.array_equal(got, want), "kvshard and the baseline disagree"
    inputs = (computed, ones, table, sc.P)
    metadata = (
        timed(lambda: build_update_slices(*inputs), args.repeats),
        timed(lambda: vllm_slot_mapping(*inputs), args.repeats),
    )
    for _ in range(3):  # warm-up
        sc.kvshard_step()
        sc.baseline_step()
    step = (timed(sc.kvshard_step, args.repeats), timed(sc.baseline_step, args.repeats))
    return {"metadata": metadata, "host step": step}


TABLE_HEADER = f"{'step':<28}{'kvshard us':>14}{'baseline us':>14}{'speedup':>10}"


def print_header(args: argparse.Namespace) -> None:
    print(f"page_size={args.page_size} context~{args.context} repeats={args.repeats}")
    print("times: min (median) over repeats; speedup = baseline min / kvshard min\n")
    print(TABLE_HEADER)
    print("-" * len(TABLE_HEADER))


def print_row(name: str, ours: tuple[float, float], theirs: tuple[float, float]) -> None:
    a = f"{ours[0] * 1e6:.0f} ({ours[1] * 1e6:.0f})"
    b = f"{theirs[0] * 1e6:.0f} ({theirs[1] * 1e6:.0f})"
    print(f"{name:<28}{a:>14}{b:>14}{theirs[0] / ours[0]:>9.1f}x")


def measure_mixed(args: argparse.Namespace, batch: int) -> tuple:
    """(kvshard, baseline) (min, median) seconds of a mixed step: B decodes + new prefills."""
    sc = Scenario(args, batch, prefills=args.prefills)
    return (
        timed(sc.kvshard_step, args.repeats, setup=sc.reset),
        timed(sc.baseline_step, args.repeats, setup=sc.reset),
    )


def run(args: argparse.Namespace) -> None:
    print_header(args)
    for batch in args.batch_sizes:
        for name, (ours, theirs) in measure_decode(args, batch).items():
            print_row(f"{name} decode B={batch}", ours, theirs)
    for batch in args.batch_sizes:
        print_row(
            f"host step mixed B={batch}+{args.prefills}x{args.prefill_chunk}",
            *measure_mixed(args, batch),
        )


NAME = "host_step"
ROWS = ("metadata decode", "host step decode", "host step mixed")


def sweep(
    outdir: str,
    *,
    batch_sizes: list[int],
    repeats: int,
    page_size: int = 16,
    context: int = 1024,
    prefills: int = 4,
    prefill_chunk: int = 512,
) -> dict[str, Any]:
    """The suite's host-step benchmark: every row for every B, a table, JSON and a plot vs B."""
    args = argparse.Namespace(
        batch_sizes=batch_sizes,
        repeats=repeats,
        page_size=page_size,
        context=context,
        prefills=prefills,
        prefill_chunk=prefill_chunk,
    )
    results: dict[str, dict[int, tuple]] = {row: {} for row in ROWS}
    for batch in batch_sizes:
        decode = measure_decode(args, batch)
        results["metadata decode"][batch] = decode["metadata"]
        results["host step decode"][batch] = decode["host step"]
        results["host step mixed"][batch] = measure_mixed(args, batch)
    host = machine()
    print(f"## host step: kvshard vs the per-request-loop baseline (vLLM TPU runner)\n{host}")
    print(f"mixed = B decodes + {prefills} prefills of {prefill_chunk} tokens")
    print_header(args)
    for row in ROWS:
        for batch in batch_sizes:
            print_row(f"{row} B={batch}", *results[row][batch])
    data = {
        "machine": host,
        "settings": vars(args),
        "rows": {
            row: [
                {"B": b, "kvshard_s": ours, "baseline_s": theirs, "speedup": theirs[0] / ours[0]}
                for b, (ours, theirs) in results[row].items()
            ]
            for row in ROWS
        },
    }
    write_json(outdir, NAME, data)
    png = plot(results, args, outdir, host)
    print("\n" + wrote(f"{outdir}/{NAME}.json", png))
    return data


def plot(results: dict[str, dict[int, tuple]], args: argparse.Namespace, outdir: str, host: str):
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    styles = {
        "metadata decode": ("o", ":"),
        "host step decode": ("s", "-"),
        "host step mixed": ("^", "--"),
    }
    for row, (marker, line) in styles.items():
        batches = list(results[row])
        for i, (impl, color) in enumerate(
            (("kvshard", "tab:blue"), ("baseline (per-request loop)", "tab:red"))
        ):
            us = [results[row][b][i][0] * 1e6 for b in batches]
            ax.plot(batches, us, marker=marker, linestyle=line, color=color, label=f"{impl}: {row}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    batches = args.batch_sizes
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel(
        f"batch size B (decoding requests; mixed adds {args.prefills}x"
        f"{args.prefill_chunk}-token prefills)"
    )
    ax.set_ylabel(f"time per step, µs (min of {args.repeats} runs)")
    ax.set_title(
        f"Host cost of a serving step (page_size={args.page_size}, context~{args.context})\n{host}",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, outdir, NAME)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--context", type=int, default=1024, help="tokens held per request")
    parser.add_argument("--prefills", type=int, default=4, help="new requests per mixed step")
    parser.add_argument("--prefill-chunk", type=int, default=512, help="tokens per prefill")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--plot", metavar="DIR", help="also write host_step.json and host_step.png to DIR"
    )
    args = parser.parse_args(argv)
    if args.plot:
        sweep(
            args.plot,
            batch_sizes=args.batch_sizes,
            repeats=args.repeats,
            page_size=args.page_size,
            context=args.context,
            prefills=args.prefills,
            prefill_chunk=args.prefill_chunk,
        )
    else:
        run(args)


if __name__ == "__main__":
    main()
