"""The ``kvshard`` command: size a KV cache for a mesh, run the demo and the host benchmark.

Usage::

    kvshard plan --model llama-3-70b --mesh 1x8 --hbm-per-device 16GiB
    kvshard plan --layers 32 --kv-heads 8 --head-dim 128 --dtype int8 \\
                 --mesh 2x4 --hbm-per-device 12GB --json
    kvshard demo [ARGS...]     # python examples/tp_decode.py ARGS...
    kvshard bench [ARGS...]    # python -m kvshard.benchmarks ARGS... (the suite; --quick)
    kvshard bench-cache [ARGS...]  # python -m kvshard.benchmarks.cache_update ARGS...

``python -m kvshard`` is the same command. Exit status: 0 on success; 2 for a bad argument
(the message on stderr names the argument, the value and the bound); for ``demo`` and ``bench``
the script's own status.

``plan`` takes its arithmetic from :class:`kvshard.CacheSpec`. A *page* is one page id: it
names the same ``page_size`` token slots in every layer's cache, so "bytes per page" counts all
layers (the per-layer figure is shown too). Each device of a data-parallel group holds the
whole page pool for its own heads, so pages per device = pages per pool.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from kvshard._layout import CacheSpec, check_tensor_parallel, round_up
from kvshard._presets import PRESETS

__all__ = ["MODULES", "SCRIPTS", "BudgetTooSmall", "main", "make_plan", "parse_bytes", "parse_mesh"]

# Scripts `kvshard demo` runs, relative to the source tree.
SCRIPTS: dict[str, tuple[str, ...]] = {
    "demo": ("examples", "tp_decode.py"),
}
# Modules `kvshard bench` / `bench-cache` run: they ship in the package (work after pip install).
MODULES: dict[str, str] = {
    "bench": "kvshard.benchmarks",
    "bench-cache": "kvshard.benchmarks.cache_update",
}

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}

_DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
    "fp8": "float8_e4m3fn",
    "float8": "float8_e4m3fn",
    "e4m3": "float8_e4m3fn",
    "i8": "int8",
}

# Pages 0 .. num_pages-1 of one pool; page 0 is the allocator's null page.
_MIN_PAGES = 2


class BudgetTooSmall(ValueError):
    """The HBM budget holds fewer than two pages (the null page and one usable page)."""


# --------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------


def parse_bytes(text: str) -> int:
    """Returns the byte count of ``text``: raw bytes (``"1000000"``) or a number with a unit.

    Units (case-insensitive): B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB (powers of
    1024); fractions allowed (``"1.5GB"``), rounded down to whole bytes.

    Raises:
      ValueError: malformed, unknown unit, or not positive.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not a size; write e.g. 16GiB, 512MiB, 1.5GB or 1000000")
    number, unit = match.groups()
    if unit.lower() not in _UNITS:
        raise ValueError(
            f"{text!r} has unknown unit {unit!r}; use B, KB, MB, GB, TB (powers of 1000) or "
            "KiB, MiB, GiB, TiB (powers of 1024)"
        )
    try:
        value = int(Decimal(number) * _UNITS[unit.lower()])
    except InvalidOperation as err:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"{text!r} is not a size") from err
    if value < 1:
        raise ValueError(f"{text!r} is {value} bytes; must be at least 1 byte")
    return value


def parse_mesh(text: str) -> tuple[int, int]:
    """Returns ``(data, model)`` from ``"DATAxMODEL"``, e.g. ``"2x4"`` -> ``(2, 4)``.

    Raises:
      ValueError: not two positive integers joined by ``x``.
    """
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not match:
        raise ValueError(
            f"{text!r} is not DATAxMODEL; write e.g. 2x4 (2 data-parallel groups of 4-way "
            "tensor parallelism over KV heads) or 1x8"
        )
    data, model = (int(g) for g in match.groups())
    if data < 1 or model < 1:
        raise ValueError(f"{text!r}: both mesh axes must be >= 1")
    return data, model


def _arg_type(parse, what: str):
    """Wraps a parser so argparse reports its ValueError as ``argument --x: <message>``."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = what  # argparse names the type in some messages
    return convert


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"{value} must be >= 1")
    return value


def _dtype(text: str) -> str:
    name = _DTYPE_ALIASES.get(text.lower(), text)
    try:
        return CacheSpec(1, 1, 1, 1, 1, dtype=name).dtype
    except ValueError:
        aliases = ", ".join(sorted(_DTYPE_ALIASES))
        raise ValueError(
            f"unknown dtype {text!r}; use one of float32, bfloat16, float16, int8, "
            f"float8_e4m3fn (or {aliases})"
        ) from None


def _model(text: str) -> str:
    name = text.lower()
    if name not in PRESETS:
        raise ValueError(f"unknown model {text!r}; known presets: {', '.join(PRESETS)}")
    return name


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """Returns ``(parser, plan_parser)``."""
    from kvshard import __version__

    parser = argparse.ArgumentParser(
        prog="kvshard",
        description="Paged KV cache sharded by KV head over a JAX mesh: planning and demos.",
    )
    parser.add_argument("--version", action="version", version=f"kvshard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    plan = sub.add_parser(
        "plan",
        help="size the KV cache for a model on a mesh with a per-device HBM budget",
        description=(
            "Size a combined-head paged KV cache, sharded by KV head, for a model on a mesh. "
            "A page is one page id: page_size token slots in every layer. Explicit "
            "--layers/--kv-heads/--head-dim override the values of --model."
        ),
    )
    plan.add_argument(
        "--model",
        type=_arg_type(_model, "model"),
        help=f"built-in preset: {', '.join(PRESETS)}",
    )
    plan.add_argument("--layers", type=_arg_type(_positive_int, "int"), help="transformer layers")
    plan.add_argument(
        "--kv-heads", type=_arg_type(_positive_int, "int"), help="KV heads (before replication)"
    )
    plan.add_argument("--head-dim", type=_arg_type(_positive_int, "int"), help="head dimension")
    plan.add_argument(
        "--dtype",
        type=_arg_type(_dtype, "dtype"),
        default="bfloat16",
        help="cache dtype: float32, bfloat16, float16, int8, float8_e4m3fn (default bfloat16)",
    )
    plan.add_argument(
        "--page-size",
        type=_arg_type(_positive_int, "int"),
        default=32,
        help="token slots per page (default 32)",
    )
    plan.add_argument(
        "--mesh",
        type=_arg_type(parse_mesh, "mesh"),
        default=(1, 1),
        metavar="DATAxMODEL",
        help="data-parallel groups x tensor-parallel (KV-head) axis, e.g. 2x4 (default 1x1)",
    )
    plan.add_argument(
        "--hbm-per-device",
        type=_arg_type(parse_bytes, "size"),
        required=True,
        metavar="SIZE",
        help="memory each device gives to the KV cache: 16GiB, 512MiB, 1.5GB or bytes",
    )
    plan.add_argument(
        "--context",
        type=_arg_type(_positive_int, "int"),
        default=8192,
        help="sequence length for the concurrency row (default 8192)",
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")

    for name, help_text in (
        ("demo", "run examples/tp_decode.py (extra arguments are passed through)"),
        ("bench", "run the benchmark suite (kvshard.benchmarks; try --quick, --help)"),
        ("bench-cache", "run the cache-update benchmark (kvshard.benchmarks.cache_update)"),
    ):
        script = sub.add_parser(name, help=help_text, description=help_text, add_help=False)
        script.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    return parser, plan


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


def make_plan(
    *,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: str,
    page_size: int,
    dp: int,
    tp: int,
    hbm_per_device: int,
    context: int,
    model: str | None = None,
) -> dict[str, Any]:
    """Returns the plan as a JSON-ready dict (all byte counts are per device).

    Raises:
      BudgetTooSmall: the budget holds fewer than 2 pages (page 0 is the null page).
      ValueError: ``tp`` neither divides nor is a multiple of ``num_kv_heads`` (the message of
        :func:`kvshard.check_tensor_parallel`), or a bad size/dtype (from
        :class:`kvshard.CacheSpec`).
    """
    replication = check_tensor_parallel(num_kv_heads, tp)
    one = CacheSpec(num_layers, num_kv_heads, head_dim, page_size, 1, dtype)
    page_bytes_layer = one.page_bytes_per_device(tp)
    page_bytes = one.bytes_per_device(tp, dp)  # one page id, every layer
    num_pages = hbm_per_device // page_bytes
    if num_pages < _MIN_PAGES:
        need = _MIN_PAGES * page_bytes
        raise BudgetTooSmall(
            f"{hbm_per_device:,} bytes ({_human(hbm_per_device)}) holds {num_pages} page(s) of "
            f"{page_bytes:,} bytes ({num_layers} layers x {page_bytes_layer:,}); need at least "
            f"{_MIN_PAGES} pages (page 0 is the null page): >= {need:,} bytes ({_human(need)})"
        )
    spec = dataclasses.replace(one, num_pages=num_pages)
    cache_bytes = spec.bytes_per_device(tp, dp)
    usable = num_pages - 1

    # Where the bytes of the usable pages go: stored = distinct K/V + replicas + head_dim
    # padding + packing padding. Every term is exact except the distinct/replica split, which
    # rounds down (a device may hold a fraction of a head's "distinct" share).
    rows = num_layers * usable * page_size  # token-slot rows of the usable pages, all layers
    item = spec.np_dtype.itemsize
    combined = spec.combined_heads_per_device(tp)
    stored = usable * page_bytes
    unpacked = rows * combined * spec.padded_head_dim * item
    unpadded = rows * combined * head_dim * item
    distinct = unpadded // replication
    waste = {
        "head_dim_padding": unpacked - unpadded,
        "dtype_packing": stored - unpacked,
        "head_replication": unpadded - distinct,
        "null_page": page_bytes,
        "budget_remainder": hbm_per_device - cache_bytes,
    }
    pages_per_sequence = -(-context // page_size)
    per_group = usable // pages_per_sequence
    return {
        "model": model,
        "num_layers": num_layers,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "dtype": spec.dtype,
        "page_size": page_size,
        "mesh": {"data": dp, "model": tp},
        "hbm_per_device": hbm_per_device,
        "context": context,
        "replication": replication,
        "heads_per_device": spec.heads_per_device(tp),
        "combined_heads_per_device": combined,
        "packing": spec.packing,
        "packed_rows_per_device": round_up(combined, spec.packing),
        "padded_head_dim": spec.padded_head_dim,
        "local_shape": list(spec.local_shape(tp)),
        "global_shape": list(spec.global_shape(tp, dp)),
        "page_bytes_per_layer": page_bytes_layer,
        "page_bytes": page_bytes,
        "pages_per_device": num_pages,
        "usable_pages_per_device": usable,
        "cache_bytes_per_device": cache_bytes,
        "tokens_per_group": usable * page_size,
        "tokens_total": dp * usable * page_size,
        "pages_per_sequence": pages_per_sequence,
        "sequences_per_group": per_group,
        "sequences_total": dp * per_group,
        "kv_bytes": distinct,
        "waste_bytes": waste,
        "waste_percent": {k: 100 * v / hbm_per_device for k, v in waste.items()},
        "int32_ok": num_layers * spec.slots_per_pool <= 2**31 - 1,
    }


def _human(n: int) -> str:
    """1310720 -> '1.25 MiB'."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n} B"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _shape(shape: list[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def format_plan(plan: dict[str, Any]) -> str:
    """Renders :func:`make_plan`'s dict as plain aligned text."""
    p = plan
    dp, tp = p["mesh"]["data"], p["mesh"]["model"]
    L, P, budget = p["num_layers"], p["page_size"], p["hbm_per_device"]
    name = p["model"] or "custom model"
    r = p["replication"]
    head_note = (
        f"{p['heads_per_device']} of {p['num_kv_heads']} heads per device"
        if r == 1
        else f"each of {p['num_kv_heads']} heads on {r} devices, 1 per device"
    )
    sections: list[tuple[str, list[tuple[str, str, str]]]] = [
        (
            "layout (per device)",
            [
                ("KV head replication", f"x{r}", head_note),
                (
                    "combined K/V rows per slot",
                    f"{p['combined_heads_per_device']}",
                    f"stored as {p['packed_rows_per_device']} (packing {p['packing']} for "
                    f"{p['dtype']})",
                ),
                ("head_dim", f"{p['head_dim']}", f"stored as {p['padded_head_dim']}"),
                ("cache shape, one device", _shape(p["local_shape"]), ""),
                ("cache shape, global", _shape(p["global_shape"]), ""),
            ],
        ),
        (
            "capacity",
            [
                (
                    "bytes per page per device, 1 layer",
                    f"{p['page_bytes_per_layer']:,}",
                    _human(p["page_bytes_per_layer"]),
                ),
                (
                    f"bytes per page per device, {L} layers",
                    f"{p['page_bytes']:,}",
                    f"{_human(p['page_bytes'])}; a page id spans every layer",
                ),
                (
                    "pages per device (= per DP pool)",
                    f"{p['pages_per_device']:,}",
                    f"{p['usable_pages_per_device']:,} usable: page 0 is the null page",
                ),
                ("cache bytes per device", f"{p['cache_bytes_per_device']:,}", ""),
                (
                    "tokens per DP group",
                    f"{p['tokens_per_group']:,}",
                    f"{p['usable_pages_per_device']:,} pages x {P}",
                ),
                (f"tokens in total ({_plural(dp, 'DP group')})", f"{p['tokens_total']:,}", ""),
                (
                    f"concurrent sequences of {p['context']:,} tokens",
                    f"{p['sequences_total']:,}",
                    f"{p['sequences_per_group']:,} per DP group, "
                    f"{p['pages_per_sequence']:,} pages each",
                ),
            ],
        ),
    ]
    labels = {
        "head_dim_padding": f"head_dim padding ({p['head_dim']} -> {p['padded_head_dim']})",
        "dtype_packing": (
            f"dtype packing ({p['combined_heads_per_device']} -> "
            f"{p['packed_rows_per_device']} rows)"
        ),
        "head_replication": f"head replication (x{r})",
        "null_page": "null page 0 (reserved)",
        "budget_remainder": "remainder (< 1 page)",
    }
    budget_rows = [
        ("K/V of distinct heads", f"{p['kv_bytes']:,}", f"{100 * p['kv_bytes'] / budget:.2f}%")
    ]
    for key, label in labels.items():
        budget_rows.append((label, f"{p['waste_bytes'][key]:,}", f"{p['waste_percent'][key]:.2f}%"))
    sections.append(("where the budget goes (bytes per device, % of budget)", budget_rows))

    width = max(len(label) for _, rows in sections for label, _, _ in rows)
    value_width = max(len(value) for _, rows in sections for _, value, _ in rows)
    lines = [
        f"kvshard plan: {name} ({L} layers, {p['num_kv_heads']} KV heads, head_dim "
        f"{p['head_dim']}), {p['dtype']}, page_size {P}",
        f"mesh {dp}x{tp}: {_plural(dp, 'data-parallel group')} x {tp}-way tensor parallelism "
        "over KV heads",
        f"budget: {budget:,} bytes ({_human(budget)}) of HBM per device for the KV cache",
    ]
    for title, rows in sections:
        lines += ["", title]
        for label, value, note in rows:
            lines.append(f"  {label:<{width}}  {value:>{value_width}}  {note}".rstrip())
    return "\n".join(lines)


def _run_plan(args: argparse.Namespace, plan_parser: argparse.ArgumentParser) -> int:
    preset = PRESETS[args.model] if args.model else None
    geometry = {}
    missing = []
    for flag, dest, field in (
        ("--layers", "layers", "num_layers"),
        ("--kv-heads", "kv_heads", "num_kv_heads"),
        ("--head-dim", "head_dim", "head_dim"),
    ):
        value = getattr(args, dest)
        if value is None and preset is not None:
            value = getattr(preset, field)
        if value is None:
            missing.append(flag)
        geometry[field] = value
    if missing:
        plan_parser.error(
            f"the following arguments are required without --model: {', '.join(missing)} "
            f"(or pick a preset with --model: {', '.join(PRESETS)})"
        )
    dp, tp = args.mesh
    try:
        check_tensor_parallel(geometry["num_kv_heads"], tp)
    except ValueError as err:
        plan_parser.error(f"argument --mesh: {dp}x{tp}: {err}")
    try:
        plan = make_plan(
            **geometry,
            dtype=args.dtype,
            page_size=args.page_size,
            dp=dp,
            tp=tp,
            hbm_per_device=args.hbm_per_device,
            context=args.context,
            model=args.model,
        )
    except BudgetTooSmall as err:
        plan_parser.error(f"argument --hbm-per-device: {err}")
    except ValueError as err:
        plan_parser.error(str(err))
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        print(format_plan(plan))
    if not plan["int32_ok"]:
        print(
            "warning: layers x pages x page_size exceeds int32; the Pallas backend offsets "
            "kv_cache_start by layer * slots in int32 and would overflow",
            file=sys.stderr,
        )
    return 0


# --------------------------------------------------------------------------------------------
# demo / bench
# --------------------------------------------------------------------------------------------


def _source_root() -> Path:
    """The repository root when kvshard runs from a source checkout (editable install)."""
    return Path(__file__).resolve().parents[1]


def run_script(name: str, args: list[str], root: Path | None = None) -> int:
    """Runs ``SCRIPTS[name]`` in a fresh interpreter with ``args``; returns its exit status.

    A subprocess rather than ``runpy``: the scripts set ``XLA_FLAGS`` (simulated devices) before
    importing JAX, which this process has already imported.
    """
    path = (root if root is not None else _source_root()).joinpath(*SCRIPTS[name])
    if not path.is_file():
        print(
            f"kvshard {name}: {'/'.join(SCRIPTS[name])} not found (looked for {path}); it ships "
            "with the source repository, not the wheel: clone the repository and "
            "`pip install -e .` it, or run the script from a checkout",
            file=sys.stderr,
        )
        return 2
    try:
        return subprocess.call([sys.executable, str(path), *args])
    except KeyboardInterrupt:
        return 130


def run_module(name: str, args: list[str]) -> int:
    """Runs ``python -m MODULES[name] args`` in a fresh interpreter; returns its exit status.

    A subprocess for the same reason as :func:`run_script`: JAX reads its flags at import.
    """
    try:
        return subprocess.call([sys.executable, "-m", MODULES[name], *args])
    except KeyboardInterrupt:
        return 130


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Runs the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SCRIPTS:  # pass everything through, --help included
        return run_script(argv[0], argv[1:])
    if argv and argv[0] in MODULES:
        return run_module(argv[0], argv[1:])
    parser, plan_parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run_plan(args, plan_parser)
    except BrokenPipeError:  # `kvshard plan ... | head`: stop quietly, as other tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
