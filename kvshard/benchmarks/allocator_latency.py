"""Latency of ``PageAllocator.allocate`` and ``free``, from the free stack and while evicting.

Two allocators with prefix caching on run side by side, one call of each in turn, so both
see the same machine load:

* **free stack**: half the pool is held by live requests, the rest is on the free stack; each
  iteration allocates a new request of ``--pages`` pages and frees it again.
* **evicting**: every page not held is a cached, evictable page (the free stack is empty), as
  in a long-running server with prefix caching; each iteration allocates ``--pages`` pages,
  which evicts that many of the least recently released cached pages, registers them under
  fresh tokens (``commit_prefix``, not timed) and frees the request, so its pages go back to
  the end of the eviction order and the next allocation evicts again.

The target: p99 of ``allocate`` while evicting within 2x of allocating from the free
stack, at 100k and 1M pages.

Usage::

    python -m kvshard.benchmarks.allocator_latency            # 100k and 1M pages
    python -m kvshard.benchmarks.allocator_latency --quick    # 100k pages, fewer calls
    kvshard bench --only allocator_latency                    # the same inside the suite

``--clock cpu`` times with the process's CPU clock instead of the wall clock: on a shared
machine the wall clock's p99 is mostly time spent descheduled, not in the allocator.

Prints a table of p50/p99 latencies (microseconds) and writes
``<--out>/allocator_latency.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from kvshard.allocator import PageAllocator

PAGE_SIZE = 16
MAX_PAGES = 64  # per request: 1024 tokens


class Scenario:
    """One allocator in steady state, ``free stack`` or ``evicting``; times one cycle."""

    def __init__(self, num_pages: int, pages: int, evicting: bool, clock: str = "wall") -> None:
        self.pages, self.evicting = pages, evicting
        self.now = time.perf_counter_ns if clock == "wall" else time.process_time_ns
        fill = (num_pages - 1) // MAX_PAGES
        self.alloc = PageAllocator(
            num_pages,
            PAGE_SIZE,
            max_requests=fill + 2,
            max_pages_per_request=MAX_PAGES,
            enable_prefix_caching=True,
        )
        self.serial = 0
        held = fill // 2
        for i in range(fill):
            self.alloc.allocate(("fill", i), MAX_PAGES * PAGE_SIZE)
            if evicting:
                self.alloc.commit_prefix(("fill", i), self._tokens(MAX_PAGES))
            if evicting or i >= held:
                self.alloc.free(("fill", i))
        if evicting:  # the pages left over: allocated, cached, freed, so nothing is plain free
            rest = self.alloc.num_free_pages - self.alloc.num_evictable_pages
            while rest:
                take = min(rest, MAX_PAGES)
                self.alloc.allocate("rest", take * PAGE_SIZE)
                self.alloc.commit_prefix("rest", self._tokens(take))
                self.alloc.free("rest")
                rest -= take
            assert self.alloc.num_free_pages == self.alloc.num_evictable_pages

    def _tokens(self, pages: int) -> np.ndarray:
        """Token ids no other page has (so every commit registers new keys)."""
        self.serial += 1
        return np.arange(pages * PAGE_SIZE, dtype=np.int64) + self.serial * (1 << 32)

    def cycle(self) -> tuple[int, int]:
        """Returns (ns of allocate, ns of free) of one request of ``pages`` pages."""
        a = self.alloc
        now = self.now
        t0 = now()
        a.allocate("r", self.pages * PAGE_SIZE)
        t1 = now()
        if self.evicting:
            a.commit_prefix("r", self._tokens(self.pages))
        t2 = now()
        a.free("r")
        t3 = now()
        return t1 - t0, t3 - t2


def measure(
    num_pages: int, pages: int, calls: int, clock: str = "wall"
) -> dict[str, dict[str, float]]:
    """Runs both scenarios interleaved; returns {scenario: {op_p50/op_p99 in us}}."""
    scenarios = {"free stack": Scenario(num_pages, pages, False, clock)}
    scenarios["evicting"] = Scenario(num_pages, pages, True, clock)
    times: dict[str, list[tuple[int, int]]] = {name: [] for name in scenarios}
    for _ in range(calls // 10):  # warm-up
        for s in scenarios.values():
            s.cycle()
    for _ in range(calls):
        for name, s in scenarios.items():
            times[name].append(s.cycle())
    evictions = scenarios["evicting"].alloc.prefix_stats["evictions"]
    assert evictions >= calls * pages, "the evicting scenario did not evict"
    assert scenarios["free stack"].alloc.prefix_stats["evictions"] == 0
    out: dict[str, dict[str, float]] = {}
    for name, samples in times.items():
        ns = np.array(samples, np.float64) / 1e3
        out[name] = {
            f"{op}_{q}": float(np.percentile(ns[:, i], pct))
            for i, op in enumerate(("allocate", "free"))
            for q, pct in (("p50", 50), ("p99", 99))
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="allocator_latency.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="100k pages only, fewer calls")
    parser.add_argument("--num-pages", type=int, nargs="+", help="pool sizes (default 100k 1M)")
    parser.add_argument("--pages", type=int, nargs="+", default=[1, 16], help="pages per call")
    parser.add_argument("--calls", type=int, help="timed calls per case (default 3000; quick 500)")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="wall or process CPU time"
    )
    parser.add_argument("--out", default="bench-results", help="folder for the JSON")
    args = parser.parse_args(argv)
    sizes = args.num_pages or ([100_001] if args.quick else [100_001, 1_000_001])
    calls = args.calls or (500 if args.quick else 3000)
    rows = []
    header = (
        f"{'pages':>9} {'per call':>8} {'scenario':>10} {'alloc p50':>9} {'alloc p99':>9} "
        f"{'free p50':>9} {'free p99':>9}  (us)"
    )
    print(header)
    for num_pages in sizes:
        for pages in args.pages:
            result = measure(num_pages, pages, calls, args.clock)
            for name, stats in result.items():
                rows.append({"num_pages": num_pages, "pages": pages, "scenario": name, **stats})
                print(
                    f"{num_pages:>9} {pages:>8} {name:>10} {stats['allocate_p50']:>9.1f} "
                    f"{stats['allocate_p99']:>9.1f} {stats['free_p50']:>9.1f} "
                    f"{stats['free_p99']:>9.1f}"
                )
            ratio = result["evicting"]["allocate_p99"] / result["free stack"]["allocate_p99"]
            print(f"{'':>9} {'':>8} {'ratio':>10} p99 allocate evicting / free stack = {ratio:.2f}")
    report = {
        "benchmark": "allocator_latency",
        "machine": f"{platform.machine()} {platform.processor()} {os.cpu_count()} cores",
        "python": platform.python_version(),
        "calls": calls,
        "clock": args.clock,
        "page_size": PAGE_SIZE,
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "allocator_latency.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
