"""The ``kvshard`` command: size a KV cache for a mesh, run the demo and the benchmarks.

One argparse front end: every subcommand's flags, help and error messages in one place, the
arithmetic itself in :mod:`kvshard._geometry.plan`.

Usage::

    kvshard plan --model llama-3-70b --mesh 1x8 --hbm-per-device 16GiB
    kvshard plan --config path/to/config.json --mesh 2x4 --hbm-per-device 12GB --kv-dtype int8
    kvshard plan --layers 32 --kv-heads 8 --head-dim 128 --hbm-per-device 12GB --json
    kvshard plan --model llama-3-70b --mesh 1x8 --hbm-per-device 16GiB --host-memory 256GiB
    kvshard demo [ARGS...]             # the continuous-batching demo (kvshard demo --help)
    kvshard bench [ARGS...]            # the benchmark suite (kvshard.benchmarks)
    kvshard bench-cache [ARGS...]      # in-place cache update vs a copied one
    kvshard bench-schedules [ARGS...]  # the update kernel's DMA schedules, A/B (on a TPU)

``python -m kvshard`` is the same command. Exit status: 0 on success; 2 for a bad argument, with
one line on stderr naming the argument, the value and the bound; for ``demo`` and ``bench`` the
script's own status (``bench-cache`` and ``bench-schedules`` too).

``plan`` imports no JAX (``import kvshard`` is lazy) and takes its arithmetic from
:mod:`kvshard._geometry.plan`; ``--model NAME`` reads a Hugging Face config.json shipped in
``kvshard/configs/``, ``--config PATH`` reads yours (:func:`kvshard.read_model_config`).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from decimal import Decimal, InvalidOperation
from typing import NoReturn

from kvshard._geometry.hf_config import (
    PRESETS,
    ConfigError,
    ModelGeometry,
    preset_config,
    read_model_config,
)
from kvshard._geometry.layer_types import LayerType
from kvshard._geometry.layout import (
    KV_LAYOUTS,
    SUPPORTED_DTYPES,
    canonical_dtype,
    check_query_heads,
    check_tensor_parallel,
)
from kvshard._geometry.plan import (
    BudgetTooSmall,
    ContextTooLong,
    HostMemoryTooSmall,
    format_plan,
    make_plan,
    window_pages,
)
from kvshard._launch import SCRIPTS, Script, run_script

__all__ = [
    "SCRIPTS",
    "BudgetTooSmall",
    "ContextTooLong",
    "Script",
    "format_plan",
    "main",
    "make_plan",
    "parse_bytes",
    "parse_mesh",
    "run_script",
    "window_pages",
]


COMMANDS = ("plan", *SCRIPTS)

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
    match = re.fullmatch(r"\s*([-+]?)\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not a size; write e.g. 16GiB, 512MiB, 1.5GB or 1000000")
    sign, number, unit = match.groups()
    if unit.lower() not in _UNITS:
        raise ValueError(
            f"{text!r} has unknown unit {unit!r}; use B, KB, MB, GB, TB (powers of 1000) or "
            "KiB, MiB, GiB, TiB (powers of 1024)"
        )
    try:
        value = int(Decimal(number) * _UNITS[unit.lower()])
    except InvalidOperation as err:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"{text!r} is not a size") from err
    if sign == "-" and value:
        raise ValueError(f"{text!r} is negative; a size must be at least 1 byte")
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


def _window(text: str) -> int:
    if text.strip() == "0":
        return 0  # no window
    try:
        return _positive_int(text)
    except ValueError as err:
        raise ValueError(f"{err} (or 0 for no window)") from None


def _dtype(text: str) -> str:
    name = _DTYPE_ALIASES.get(text.lower(), text)
    try:
        return canonical_dtype(name)
    except ValueError:
        aliases = ", ".join(sorted(_DTYPE_ALIASES))
        raise ValueError(
            f"unknown dtype {text!r}; use one of {', '.join(SUPPORTED_DTYPES)} (or {aliases})"
        ) from None


def _model(text: str) -> str:
    name = text.lower()
    if name not in PRESETS:
        hint = difflib.get_close_matches(name, PRESETS, n=1)
        did_you_mean = f"did you mean {hint[0]!r}? " if hint else ""
        raise ValueError(
            f"unknown model {text!r}; {did_you_mean}known presets: {', '.join(PRESETS)}"
        )
    return name


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line: ``prog: error: message (see prog --help)``.

    argparse prints the whole usage first, which buries the message under five lines.
    """

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())  # one line, whatever argparse composed
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """Returns ``(parser, plan_parser)``."""
    from kvshard import __version__

    parser = _Parser(
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
            "A page is one page id: page_size token slots in every layer. The model comes "
            "from --model (a shipped config), --config (a Hugging Face config.json) or the "
            "explicit --layers/--kv-heads/--head-dim, which also override the other two."
        ),
    )
    source = plan.add_mutually_exclusive_group()
    source.add_argument(
        "--model",
        type=_arg_type(_model, "model"),
        help=f"a shipped model config: {', '.join(PRESETS)}",
    )
    source.add_argument(
        "--config",
        metavar="PATH",
        help="a Hugging Face config.json (or a model directory holding one)",
    )
    plan.add_argument("--layers", type=_arg_type(_positive_int, "int"), help="transformer layers")
    plan.add_argument(
        "--kv-heads", type=_arg_type(_positive_int, "int"), help="KV heads (before replication)"
    )
    plan.add_argument("--head-dim", type=_arg_type(_positive_int, "int"), help="head dimension")
    plan.add_argument(
        "--q-heads",
        type=_arg_type(_positive_int, "int"),
        help="query heads (default: the config's num_attention_heads): checked to split over "
        "the head axis as kvshard.attention needs",
    )
    plan.add_argument(
        "--kv-dtype",
        "--dtype",
        dest="dtype",
        type=_arg_type(_dtype, "dtype"),
        help=f"cache dtype: {', '.join(SUPPORTED_DTYPES)} (default: the config's torch_dtype, "
        "else bfloat16); shows the capacity gain over bfloat16",
    )
    plan.add_argument(
        "--sliding-window",
        type=_arg_type(_window, "int"),
        metavar="W",
        help="attention window of every layer, in tokens (default: the config's "
        "sliding_window; 0: none): pages before the window are released; replaces a config's "
        "per-layer attention types",
    )
    plan.add_argument(
        "--kv-layout",
        choices=KV_LAYOUTS,
        help="how a head's K and V sit in the cache's rows (default: packed when 2 x head_dim "
        "<= 128, else interleaved): packed keeps head_dim 64 without lane padding; "
        "interleaved is what the pallas attention backend reads",
    )
    plan.add_argument(
        "--kv-lora-rank",
        type=_arg_type(_positive_int, "int"),
        metavar="R",
        help="multi-head latent attention (DeepSeek-V3, Kimi-K2): lanes of the latent row "
        "holding c_kv (default: the config's kv_lora_rank); with --kv-heads 1 and --head-dim "
        "kv_lora_rank + qk_rope_head_dim, a kv_layout latent cache",
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
    plan.add_argument(
        "--host-memory",
        type=_arg_type(parse_bytes, "size"),
        metavar="SIZE",
        help="pinned host memory per host for the host tier (kvshard.init_host_cache): adds "
        "its pages and tokens, e.g. 256GiB",
    )
    plan.add_argument(
        "--devices-per-host",
        type=_arg_type(_positive_int, "int"),
        help="devices sharing one host's --host-memory (default: the whole mesh on one host)",
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")

    for name, script in SCRIPTS.items():
        text = f"{script.help} (arguments are passed through; kvshard {name} --help)"
        runner = sub.add_parser(name, help=text, description=text, add_help=False)
        runner.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    return parser, plan


def _check_options(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Returns ``argv`` with dash-leading values glued to their option; rejects unknown options.

    argparse takes ``--hbm-per-device -16GiB`` for two options and says "expected one
    argument"; as ``--hbm-per-device=-16GiB`` the value reaches the size parser, whose message
    says what is wrong. An unknown ``--option`` gets a did-you-mean from the known ones (argparse
    would first complain about a required option the typo was meant to be).
    """
    actions = parser._option_string_actions  # argparse has no public accessor
    known = sorted(actions)
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        if token.startswith("--") and token != "--":
            matches = [o for o in known if o.startswith(name)]
            if name not in actions and len(matches) != 1:
                hint = difflib.get_close_matches(name, known, n=1)
                parser.error(
                    f"unrecognized option {name}" + (f"; did you mean {hint[0]}?" if hint else "")
                )
        action = actions.get(name)
        takes_value = action is not None and action.nargs is None and "=" not in token
        if (
            takes_value
            and i + 1 < len(argv)
            and argv[i + 1].startswith("-")
            and argv[i + 1].split("=", 1)[0] not in actions
        ):
            out.append(f"{token}={argv[i + 1]}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


# --------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------


def _query_heads_culprit(args: argparse.Namespace, q_heads: int, shape: dict[str, int]) -> str:
    """The argument to name when query heads are refused: the mesh when they do not split over
    its head axis, else (not whole KV groups) whichever flag gave the head counts."""
    if q_heads % shape["num_kv_heads"] == 0:
        dp, tp = args.mesh
        return f"--mesh: {dp}x{tp}"
    for flag, given in (
        ("--q-heads", args.q_heads is not None),
        ("--kv-heads", args.kv_heads is not None),
        ("--model", bool(args.model)),
    ):
        if given:
            return flag
    return "--config"


def _layer_types(
    args: argparse.Namespace, geometry: ModelGeometry | None, num_layers: int
) -> tuple[tuple[LayerType, ...] | None, list[str]]:
    """The config's per-layer attention types for the planner, and the plan's notes: none
    when ``--sliding-window`` sets every layer or ``--layers`` changes the layer count."""
    if geometry is None:
        return None, []
    if args.sliding_window is not None:
        reason = "--sliding-window sets every layer's window"
    elif num_layers != geometry.num_layers:
        reason = f"--layers {num_layers} is not the config's {geometry.num_layers} layers"
    else:
        return geometry.layer_types, []
    if geometry.window_note is None:
        return None, []
    return None, [f"{geometry.window_note}; layer types not used: {reason}"]


def _run_hybrid_plan(
    args: argparse.Namespace, plan_parser: argparse.ArgumentParser, data: dict, label: str
) -> int:
    """``kvshard plan --config`` of a hybrid family with state layers
    (:mod:`kvshard._geometry.plan_state`)."""
    from kvshard._geometry.plan_state import format_state_plan, state_plan

    dp, tp = args.mesh
    text = data.get("text_config") if "num_hidden_layers" not in data else None
    inner = text if isinstance(text, dict) else data
    dtype = args.dtype or str(inner.get("torch_dtype") or inner.get("dtype") or "bfloat16")
    try:
        plan = state_plan(
            data,
            dtype=dtype.removeprefix("torch."),
            page_alignment=args.page_size,
            dp=dp,
            tp=tp,
            hbm_per_device=args.hbm_per_device,
            context=args.context,
            model=label,
        )
    except (ValueError, KeyError, TypeError) as err:
        plan_parser.error(f"argument --config: {err}")
    print(json.dumps(plan, indent=2) if args.json else format_state_plan(plan))
    return 0


def _run_plan(args: argparse.Namespace, plan_parser: argparse.ArgumentParser) -> int:
    geometry: ModelGeometry | None = None
    label = args.model
    if args.config:
        from kvshard._geometry.hf_config import load_config
        from kvshard._geometry.state_layers import is_hybrid_config

        try:
            data, _ = load_config(args.config)
        except ConfigError as err:
            plan_parser.error(f"argument --config: {err}")
        if is_hybrid_config(data):
            return _run_hybrid_plan(args, plan_parser, dict(data), args.config)
    try:
        if args.model:
            geometry = read_model_config(preset_config(args.model))
        elif args.config:
            geometry = read_model_config(args.config)
            label = args.config
    except ConfigError as err:
        plan_parser.error(f"argument {'--model' if args.model else '--config'}: {err}")
    shape: dict[str, int] = {}
    missing = []
    for flag, dest, field in (
        ("--layers", "layers", "num_layers"),
        ("--kv-heads", "kv_heads", "num_kv_heads"),
        ("--head-dim", "head_dim", "head_dim"),
    ):
        value = getattr(args, dest)
        if value is None and geometry is not None:
            value = getattr(geometry, field)
        if value is None:
            missing.append(flag)
        shape[field] = value
    if missing:
        plan_parser.error(
            f"the following arguments are required without --model or --config: "
            f"{', '.join(missing)} (shipped models: {', '.join(PRESETS)})"
        )
    dtype = args.dtype or (geometry.dtype if geometry else None)
    if dtype is None:
        if args.config:
            plan_parser.error(
                f"argument --config: {args.config}: torch_dtype is missing; pass --kv-dtype"
            )
        dtype = "bfloat16"
    window = geometry.sliding_window if geometry else None
    if args.sliding_window is not None:
        window = args.sliding_window or None
    layer_types, notes = _layer_types(args, geometry, shape["num_layers"])
    if layer_types is not None:
        window = None  # the config's window is in its layer types
    dp, tp = args.mesh
    try:
        check_tensor_parallel(shape["num_kv_heads"], tp)
    except ValueError as err:
        plan_parser.error(f"argument --mesh: {dp}x{tp}: {err}")
    q_heads = args.q_heads if args.q_heads is not None else geometry and geometry.num_q_heads
    if q_heads:
        try:
            check_query_heads(q_heads, shape["num_kv_heads"], tp)
        except ValueError as err:
            plan_parser.error(f"argument {_query_heads_culprit(args, q_heads, shape)}: {err}")
    try:
        plan = make_plan(
            num_layers=shape["num_layers"],
            num_kv_heads=shape["num_kv_heads"],
            head_dim=shape["head_dim"],
            dtype=dtype,
            page_size=args.page_size,
            dp=dp,
            tp=tp,
            hbm_per_device=args.hbm_per_device,
            context=args.context,
            model=label,
            layer_types=layer_types,
            sliding_window=window,
            num_q_heads=q_heads or None,
            host_memory=args.host_memory,
            devices_per_host=args.devices_per_host,
            kv_layout=args.kv_layout,
            kv_lora_rank=args.kv_lora_rank
            if args.kv_lora_rank is not None
            else (geometry.kv_lora_rank if geometry else None),
        )
    except BudgetTooSmall as err:
        plan_parser.error(f"argument --hbm-per-device: {err}")
    except HostMemoryTooSmall as err:
        plan_parser.error(f"argument --host-memory: {err}")
    except ContextTooLong as err:
        plan_parser.error(f"argument --context: {err}")
    except ValueError as err:
        plan_parser.error(str(err))
    plan["notes"] = notes
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        print(format_plan(plan))
    if args.devices_per_host is not None and args.host_memory is None:
        print("warning: --devices-per-host has no effect without --host-memory", file=sys.stderr)
    host = plan["host_tier"]
    if host and not host["int32_ok"]:
        print(
            "warning: the host tier's slots (DP groups x host pages x page_size) exceed int32; "
            "kvshard.init_host_cache refuses that many: use fewer host pages",
            file=sys.stderr,
        )
    if not plan["int32_ok"]:
        print(
            "warning: layers x pages x page_size exceeds int32; the Pallas backend offsets "
            "kv_cache_start by layer * slots in int32 and would overflow",
            file=sys.stderr,
        )
    return 0


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Runs the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SCRIPTS:  # pass everything through, --help included
        return run_script(argv[0], argv[1:])
    parser, plan_parser = build_parser()
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        hint = difflib.get_close_matches(argv[0], COMMANDS, n=1, cutoff=0.5)
        parser.error(
            f"unknown command {argv[0]!r}"
            + (f"; did you mean {hint[0]!r}?" if hint else "")
            + f" (commands: {', '.join(COMMANDS)})"
        )
    if argv and argv[0] == "plan":
        argv = ["plan", *_check_options(argv[1:], plan_parser)]
    args = parser.parse_args(argv)
    try:
        return _run_plan(args, plan_parser)
    except BrokenPipeError:  # `kvshard plan ... | head`: stop quietly, as other tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
