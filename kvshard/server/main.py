"""``kvshard serve``: a Hugging Face checkpoint served over HTTP (OpenAI's completions API).

    kvshard serve --checkpoint DIR [--mesh DxM] [--host 127.0.0.1] [--port 8000]
                  [--max-num-seqs N] [--kv-dtype auto|float32|bfloat16|float16]
                  [--host-memory SIZE] [--max-model-len L] [--max-num-batched-tokens T]
                  [--page-size P] [--num-pages N] [--served-model-name NAME]

Needs the ``serve`` extra (``pip install "kvshard[serve]"``: starlette, uvicorn, tokenizers).
The checkpoint folder is what :func:`kvshard.models.load_checkpoint` reads; with a
``tokenizer.json`` beside it prompts may be strings. ``--mesh DxM``: D page pools (data
parallel) x M devices splitting the heads; on a machine without accelerators the devices are
simulated CPU devices. ``--host-memory``: a host tier of that many bytes over the whole mesh
(preempted requests are swapped to it; without it they are recomputed). Routes and fields:
docs/guides/serve.md. The environment variables below are set before JAX is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any

__all__ = ["build_server", "main", "parse_args", "serve_in_thread", "start_app"]

KV_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _mesh(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected DxM with D, M >= 1, e.g. 1x2")
    return int(parts[0]), int(parts[1])


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 65535] (0: any free port)")
    return value


def _size(text: str) -> int:
    from kvshard.cli import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from kvshard.cli import _Parser  # one-line errors, as every kvshard command

    parser = _Parser(prog="kvshard serve", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a Hugging Face folder")
    parser.add_argument("--mesh", type=_mesh, default=(1, 1), help="DxM (default 1x1)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=_port, default=8000, help="0: any free port")
    parser.add_argument("--max-num-seqs", type=_positive, default=16, help="per page pool")
    parser.add_argument("--kv-dtype", choices=KV_DTYPES, default="auto", help="cache dtype")
    parser.add_argument("--host-memory", type=_size, help="host tier bytes, e.g. 4GiB")
    parser.add_argument("--max-model-len", type=_positive, help="prompt + max_tokens at most")
    parser.add_argument("--max-num-batched-tokens", type=_positive, default=256)
    parser.add_argument("--page-size", type=_positive, default=16)
    parser.add_argument("--num-pages", type=_positive, help="pages per pool (default: enough)")
    parser.add_argument("--served-model-name", help="default: the checkpoint folder's name")
    args = parser.parse_args(argv)
    if not (args.checkpoint / "config.json").is_file():
        parser.error(f"argument --checkpoint: {args.checkpoint}/config.json does not exist")
    return args


def _eos_ids(directory: Path) -> list[int]:
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = directory / name
        if path.is_file():
            value = json.loads(path.read_text("utf-8")).get("eos_token_id")
            ids += value if isinstance(value, list) else [] if value is None else [value]
    return list(dict.fromkeys(int(i) for i in ids))


def build_server(args: argparse.Namespace) -> tuple[Any, Any]:
    """(Starlette app, started EngineLoop) for parsed ``args``; JAX must see enough devices."""
    from kvshard.models import load_checkpoint
    from kvshard.server.engine import make_mesh

    dp, tp = args.mesh
    mesh = make_mesh(dp, tp)
    model = load_checkpoint(args.checkpoint, mesh)
    tokenizer = None
    if (args.checkpoint / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(args.checkpoint / "tokenizer.json"))
    kv_dtype = None if args.kv_dtype == "auto" else args.kv_dtype
    return start_app(
        model,
        mesh,
        args.served_model_name or args.checkpoint.resolve().name,
        tokenizer,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        page_size=args.page_size,
        num_pages=args.num_pages,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_dtype=kv_dtype,
        host_memory=args.host_memory or 0,
        eos_token_ids=_eos_ids(args.checkpoint),
    )


def start_app(
    model: Any, mesh: Any, name: str, tokenizer: Any, **engine_options: Any
) -> tuple[Any, Any]:
    """(Starlette app, started EngineLoop) serving ``model`` on ``mesh`` as ``name``: an
    :class:`~kvshard.server.engine.Engine` of ``engine_options`` (``max_num_seqs`` among
    them), warmed up (every token bucket compiled) before its loop starts."""
    from kvshard.server.app import ServerInfo, create_app
    from kvshard.server.engine import Engine
    from kvshard.server.loop import EngineLoop

    engine = Engine(model, mesh, **engine_options)
    info = ServerInfo(
        model_name=name,
        vocab_size=model.arch.vocab_size,
        max_model_len=engine.max_model_len,
        max_n=engine_options["max_num_seqs"],
        tokenizer=tokenizer,
    )
    engine.warmup()
    loop = EngineLoop(engine).start()
    return create_app(loop, info), loop


def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0) -> tuple[Any, int]:
    """Starts uvicorn on ``host:port`` (0: a free port) in a daemon thread; returns (the
    uvicorn Server, the bound port) once it accepts connections. ``server.should_exit = True``
    stops it."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        threading.Event().wait(0.01)
    return server, sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dp, tp = args.mesh
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if os.environ["JAX_PLATFORMS"] == "cpu":
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={max(dp * tp, 1)}"
        ).strip()
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as err:
        print(f"kvshard serve needs the serve extra: pip install 'kvshard[serve]' ({err})")
        return 2
    print(f"kvshard serve: loading {args.checkpoint} on mesh {dp}x{tp}", file=sys.stderr)
    app, loop = build_server(args)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    host, port = sock.getsockname()[:2]
    print(f"kvshard serve: listening on http://{host}:{port}", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    try:
        server.run(sockets=[sock])
    finally:
        loop.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
