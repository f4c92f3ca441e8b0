"""Shared helpers of the benchmark suite: timing, the machine line, JSON + PNG results, tables.

Host-only (no JAX import): the host benchmarks must not pay for it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def timed(fn: Callable[[], object], repeats: int, setup: Callable[[], object] | None = None):
    """Returns (min, median) seconds of ``fn()`` over ``repeats`` runs (``setup`` untimed)."""
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def interleaved(
    steps: Mapping[str, Callable[[], object]],
    rounds: int,
    *,
    every: Mapping[str, int] | None = None,
    before: Mapping[str, Callable[[], object]] | None = None,
) -> tuple[dict[str, list[float]], list[float]]:
    """Times every step once per round, round after round, so a load spike on the shared
    machine hits all of them alike. ``every`` maps a name to k: that step runs only in every
    k-th round (a slow reference). ``before`` maps a name to a call run untimed just before
    that step: steps compared with each other get the same predecessor, so none of them
    finds the CPU's worker threads and caches warmer than another (on a CPU the first call
    after a long one pays their wake-up). Returns ``({name: [seconds per run]}, [load per
    round])``.
    """
    every, before = every or {}, before or {}
    times: dict[str, list[float]] = {name: [] for name in steps}
    loads = []
    for r in range(rounds):
        loads.append(load_average())
        for name, step in steps.items():
            if r % every.get(name, 1):
                continue
            if name in before:
                before[name]()
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times, loads


def spread(values: Sequence[float], scale: float = 1e3, digits: int = 2) -> str:
    """``median (min - max)`` of ``values`` times ``scale`` (seconds to ms by default)."""
    v = [x * scale for x in values]
    return f"{statistics.median(v):.{digits}f} ({min(v):.{digits}f} - {max(v):.{digits}f})"


def load_average() -> float:
    """The 1-minute load average (0.0 where the OS gives none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def machine(accelerator: str | None = None) -> str:
    """E.g. ``2-core AMD EPYC 7B13, CPU only, Python 3.11.7, numpy 2.4.6, load 1.3``."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        load = f", load {os.getloadavg()[0]:.1f}"
    except OSError:
        load = ""
    return (
        f"{os.cpu_count()}-core {cpu}, {accelerator or 'CPU only'}, "
        f"Python {platform.python_version()}, numpy {np.__version__}{load}"
    )


def jax_machine() -> str:
    """:func:`machine` plus JAX's version and devices (imports JAX)."""
    import jax

    devices = jax.devices()
    kind = devices[0].device_kind if devices[0].platform != "cpu" else "cpu"
    return machine(f"jax {jax.__version__}, {len(devices)}x {kind}")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], first_width: int = 30) -> str:
    """Fixed-width text table: first column left-aligned, the others right-aligned."""
    widths = [first_width] + [max(12, len(h) + 2) for h in header[1:]]
    for row in rows:
        for i, cell in enumerate(row[1:], 1):
            widths[i] = max(widths[i], len(str(cell)) + 2)
    line = f"{header[0]:<{widths[0]}}" + "".join(
        f"{h:>{w}}" for h, w in zip(header[1:], widths[1:], strict=True)
    )
    out = [line, "-" * len(line)]
    for row in rows:
        out.append(
            f"{row[0]!s:<{widths[0]}}"
            + "".join(f"{c!s:>{w}}" for c, w in zip(row[1:], widths[1:], strict=True))
        )
    return "\n".join(out)


def step_times_table(rows: Sequence[dict[str, Any]], column: str, count: str) -> str:
    """The :func:`table` of a kernel benchmark's per-step times: a row per (step, ``column``)
    with its ``count``, ``min_ms`` and ``median_ms``."""
    return table(
        (f"step / {column}", count, "min ms", "median ms"),
        [
            (
                f"{r['step']:<8} {r[column]}",
                r[count],
                f"{r['min_ms']:.3f}",
                f"{r['median_ms']:.3f}",
            )
            for r in rows
        ],
        first_width=18,
    )


def write_json(outdir: str | os.PathLike, name: str, data: dict[str, Any]) -> Path:
    path = Path(outdir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return path


def write_report(outdir: str | os.PathLike, name: str, data: dict[str, Any]) -> dict[str, Any]:
    """Writes ``data`` to ``outdir/name.json`` (:func:`write_json`), prints the ``wrote`` line
    of a benchmark without plots and returns ``data``."""
    write_json(outdir, name, data)
    print(f"wrote {os.path.join(outdir, name + '.json')}")
    return data


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


PLOTS_NEED_MATPLOTLIB = (
    "no plot: plots need matplotlib (pip install matplotlib, or kvshard's [test] or [docs] "
    "extra; the [examples] extra does not have it)"
)


def wrote(json_path: str | os.PathLike, png: Path | None) -> str:
    """The line a benchmark ends with: the files it wrote, or why it wrote no plot (``png``
    None: :func:`pyplot` found no matplotlib)."""
    return f"wrote {json_path}" + (f" and {png}" if png else f"; {PLOTS_NEED_MATPLOTLIB}")


def save_figure(fig: Any, outdir: str | os.PathLike, name: str) -> Path:
    path = Path(outdir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def bar_plot(
    outdir: str | os.PathLike,
    name: str,
    title: str,
    labels: Sequence[str],
    series: dict[str, Sequence[float]],
    ylabel: str,
    log: bool = True,
) -> Path | None:
    """Grouped bars: one group per label, one bar per series. None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 3), 4.5), dpi=110)
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(labels))
    for i, (label, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label)
    ax.set_xticks(x, list(labels), rotation=30, ha="right", fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, outdir, name)


def compiled_memory(compiled: Any) -> Any:
    """``compiled.memory_analysis()`` of a ``jax.jit(...).lower(...).compile()`` executable,
    refusing a backend that reports none."""
    mem = compiled.memory_analysis()
    if mem is None:
        raise RuntimeError("this JAX backend gives no memory analysis of compiled executables")
    return mem


def unit_scales(dtype: Any) -> dict[str, Any]:
    """``k_scale``/``v_scale`` of 1 for a quantized cache dtype (a CacheSpec needs them; the
    benchmarks' byte counts and timings do not depend on them), else nothing."""
    from kvshard._geometry.layout import needs_scales

    return {"k_scale": 1.0, "v_scale": 1.0} if needs_scales(dtype) else {}


def one_layer_pool(
    batch: int, tokens: int, page_size: int, kv_heads: int, head_dim: int
) -> tuple[Any, Any]:
    """A float32 one-layer CacheSpec sized for ``batch`` requests of ``tokens`` tokens each
    (null page included), and its PageAllocator with every request grown to ``tokens``: the
    pool both attention benchmarks read."""
    import kvshard

    pages_per_seq = -(-tokens // page_size)
    spec = kvshard.CacheSpec(
        num_layers=1,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        page_size=page_size,
        num_pages=batch * pages_per_seq + 1,
        dtype="float32",
    )
    alloc = kvshard.PageAllocator(
        spec.num_pages, page_size, max_requests=batch, max_pages_per_request=pages_per_seq
    )
    alloc.allocate_batch(list(range(batch)), [tokens] * batch)
    return spec, alloc


def simulate_cpu_devices(count: int = 8) -> None:
    """Run as a script: ``count`` simulated CPU devices (one KV head each in the attention
    benchmarks). Must run before JAX is first imported."""
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
    ).strip()


def with_overrides(chosen: dict[str, Any], args: Any, keys: Sequence[str]) -> dict[str, Any]:
    """``chosen`` settings with every flag of ``keys`` the command line gave replacing its
    value (a flag left unset, None, keeps the setting)."""
    return chosen | {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def run_parsed(parser: Any, argv: list[str] | None, run: Callable[..., object]) -> int:
    """A TPU benchmark's ``main``: ``run(out, **the other flags)`` with the flags ``parser``
    (which has ``--out``) reads from ``argv``; 1 with the message when the run refuses
    (RuntimeError: no TPU, or a result that disagrees with its reference), else 0."""
    args = vars(parser.parse_args(argv))
    try:
        run(args.pop("out"), **args)
    except RuntimeError as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    return 0
