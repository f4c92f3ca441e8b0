"""What ``kvshard demo``, ``kvshard bench``, ``bench-cache`` and ``bench-schedules`` run, and how.

Each command is a module of the installed package (so it works after a plain ``pip install``);
the demo also has a script in a source checkout (``examples/tp_decode.py``), run when the
module is missing. It runs in a fresh interpreter whose ``sys.argv[0]`` is
``"kvshard NAME"``, so the script's ``--help`` and errors name the command the user typed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

__all__ = ["SCRIPTS", "Script", "run_script"]


@dataclasses.dataclass(frozen=True)
class Script:
    """A program behind ``kvshard NAME``: a module of the installed package, else (``source``
    not None) a file of a source checkout, relative to the repository root."""

    module: str
    source: tuple[str, ...] | None
    help: str


SCRIPTS: dict[str, Script] = {
    "demo": Script(
        "kvshard._demo.tp_decode",
        ("examples", "tp_decode.py"),
        "serve a small transformer with continuous batching on 8 simulated CPU devices, "
        "checked against a dense run",
    ),
    # The benchmarks live only in the package (kvshard/benchmarks/): no source-tree copy.
    "bench": Script(
        "kvshard.benchmarks",
        None,
        "the benchmark suite: every table, JSON + PNG per benchmark (--quick: small sizes)",
    ),
    "bench-cache": Script(
        "kvshard.benchmarks.cache_update",
        None,
        "donated cache update vs undonated vs a plain copy of the same bytes, per dtype",
    ),
    "serve": Script(
        "kvshard.server.main",
        None,
        "serve a Hugging Face checkpoint over HTTP (OpenAI completions API; needs kvshard[serve])",
    ),
    "bench-schedules": Script(
        "kvshard.benchmarks.update_schedules",
        None,
        "the update kernel's DMA schedules, direct vs vmem, checked against the oracle and "
        "timed (on a TPU: the A/B test that picks one)",
    ),
}


def _source_root() -> Path:
    """The repository root when kvshard runs from a source checkout (editable install)."""
    return Path(__file__).resolve().parents[1]


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def run_script(name: str, args: list[str], root: Path | None = None) -> int:
    """Runs ``kvshard NAME`` in a fresh interpreter with ``args``; returns its exit status.

    The installed module :attr:`Script.module` if the package has it (and no ``root`` is
    given), else the file :attr:`Script.source` of a source checkout (``root``, default the
    tree this file is in).
    ``sys.argv[0]`` is ``"kvshard NAME"`` so that the script's ``--help`` and errors name the
    command the user typed. A subprocess rather than ``runpy`` here: the scripts set
    ``XLA_FLAGS`` (simulated devices) before importing JAX, which must not be imported yet.
    """
    script = SCRIPTS[name]
    prog = f"kvshard {name}"
    tree = root if root is not None else _source_root()
    path = tree.joinpath(*script.source) if script.source is not None else None
    if (root is None or path is None) and _has_module(script.module):
        code = (
            "import runpy, sys; sys.argv[0] = sys.argv.pop(1); "
            "runpy.run_module(sys.argv.pop(1), run_name='__main__')"
        )
        command = [sys.executable, "-c", code, prog, script.module, *args]
    elif path is not None and path.is_file():
        # The file's directory first on sys.path, as `python path` would have it (the examples
        # import their sibling _model.py).
        # Not runpy.run_path: it resets sys.argv[0] to the file's path.
        code = (
            "import sys; sys.argv[0] = sys.argv.pop(1); __file__ = sys.argv.pop(1); "
            "sys.path.insert(0, __file__.rpartition('/')[0]); "
            "exec(compile(open(__file__, encoding='utf-8').read(), __file__, 'exec'))"
        )
        command = [sys.executable, "-c", code, prog, path.as_posix(), *args]
    else:
        where = (
            f" and no source checkout ({path} not found); reinstall kvshard, or run it from a "
            "clone of the repository"
            if path is not None
            else "; reinstall kvshard"
        )
        print(
            f"{prog}: error: not installed: no module {script.module} in this kvshard "
            f"({Path(__file__).parent}){where}",
            file=sys.stderr,
        )
        return 2
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 130
