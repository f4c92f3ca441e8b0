"""Plot the host cost of a decode step against the batch size, kvshard vs the vLLM-style baseline.

Sweeps the batch size B and times, for B decoding requests (one new token each), the update
metadata alone and the whole decode host step (allocation + metadata + padding), kvshard and
the baseline side by side in one process on the same state. Reuses ``benchmarks/host_step.py``
(its ``Scenario``, baseline and ``timed``); prints the numbers as a table and saves a log-log
plot.

Usage::

    python benchmarks/plot_host_step.py                  # writes docs/img/host_step.png
    python benchmarks/plot_host_step.py --batch-sizes 256 1024 4096 --repeats 50 --out /tmp/h.png

Needs matplotlib (the ``docs`` extra). Times are the minimum (and median) over ``--repeats``
runs of one step, in microseconds.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))  # host_step.py sits next to this file

from host_step import measure_decode, print_header, print_row

ROWS = ("metadata", "host step")
DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "..", "docs", "img", "host_step.png")


def measure(args: argparse.Namespace) -> dict[int, dict[str, tuple]]:
    """Times per batch size: ``{B: {row: ((kvshard min, median), (baseline min, median))}}``.

    Rows are ``"metadata"`` (``build_update_slices`` vs ``_get_slot_mapping_metadata``) and
    ``"host step"`` (allocate + metadata + pad): ``host_step.py``'s decode rows.
    """
    return {batch: measure_decode(args, batch) for batch in args.batch_sizes}


def print_table(results: dict[int, dict[str, tuple]], args: argparse.Namespace) -> None:
    print_header(args)
    for name in ROWS:
        for batch, rows in results.items():
            print_row(f"{name} decode B={batch}", *rows[name])


def machine() -> str:
    """E.g. ``2-core AMD EPYC, CPU only, Python 3.11.7, numpy 2.4.6``."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{os.cpu_count()}-core {cpu}, CPU only, "
        f"Python {platform.python_version()}, numpy {np.__version__}"
    )


def plot(results: dict[int, dict[str, tuple]], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(results)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    colors = {"kvshard": "tab:blue", "baseline (vLLM-style loop)": "tab:red"}
    styles = {"metadata": ("o", "--"), "host step": ("s", "-")}
    what = {"metadata": "metadata only", "host step": "whole step (allocate + metadata + pad)"}
    for name in ROWS:
        marker, line = styles[name]
        for i, (impl, color) in enumerate(colors.items()):
            us = [results[b][name][i][0] * 1e6 for b in batches]
            ax.plot(
                batches,
                us,
                marker=marker,
                linestyle=line,
                color=color,
                label=f"{impl}: {what[name]}",
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size B (decoding requests, one new token each)")
    ax.set_ylabel(f"time per step, µs (min of {args.repeats} runs)")
    ax.set_title(
        f"Host cost of a decode step (page_size={args.page_size}, context~{args.context})\n"
        f"{machine()}",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out)
    plt.close(fig)
    shown = os.path.relpath(args.out)
    print(f"\nwrote {os.path.abspath(args.out) if shown.startswith('..') else shown}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=[64, 128, 256, 512, 1024, 2048, 4096, 8192],
        help="batch sizes B to sweep (the x axis)",
    )
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per point (min shown)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="PNG to write")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--context", type=int, default=1024, help="tokens held per request")
    args = parser.parse_args(argv)
    args.prefill_chunk = 512  # sizes Scenario's page tables exactly as host_step.py's defaults
    results = measure(args)
    print_table(results, args)
    plot(results, args)


if __name__ == "__main__":
    main()
