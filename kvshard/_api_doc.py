"""Writes docs/api.md, the API reference, from the public names' signatures and docstrings.

The reference is plain Markdown, readable in the repository as on the docs site: for every
public name, its signature and the first paragraph of its docstring, grouped by topic
(:data:`SECTIONS`), with an HTML anchor ``kvshard.<name>`` (and ``kvshard.<Class>.<member>``)
that the other pages link to. The source is read with :mod:`ast`, never imported: no JAX,
flax or Hypothesis is needed, and the output is the same on every Python and JAX version.

``python -m kvshard._api_doc`` rewrites docs/api.md; ``--check`` exits 1 when it is stale
(``tests/test_api_doc.py`` runs the same comparison).
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import sys
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
API_MD = PACKAGE.parent / "docs" / "api.md"
REGENERATE = "python -m kvshard._api_doc"

# (heading, text under it, entries). An entry is a public dotted name; a module entry lists its
# members: its ``__all__`` (or a tuple given after the name), else its public definitions.
Entry = str | tuple[str, tuple[str, ...]]
SECTIONS: tuple[tuple[str, str, tuple[Entry, ...]], ...] = (
    ("Cache layout", "", ("kvshard.CacheSpec", "kvshard.check_tensor_parallel")),
    (
        "Device operations",
        "Every operation takes the cache and the layer first, then its inputs, then the step; "
        "the backends' knobs travel in one `BackendOptions`.",
        (
            "kvshard.KVCache",
            "kvshard.init_cache",
            "kvshard.abstract_cache",
            "kvshard.update",
            "kvshard.attention",
            "kvshard.fused_attention",
            "kvshard.gather",
            "kvshard.copy_pages",
        ),
    ),
    (
        "The host tier",
        "See [Host-memory tier](tiers.md).",
        ("kvshard.HostCache", "kvshard.init_host_cache", "kvshard.swap_out", "kvshard.swap_in"),
    ),
    ("Backend options", "", ("kvshard.BackendOptions", "kvshard.Backend", "kvshard.Schedule")),
    ("Model configs", "", ("kvshard.read_model_config", "kvshard.ModelGeometry")),
    ("Errors", "", ("kvshard.KvshardError", "kvshard.ConfigError")),
    (
        "Quantized caches",
        "See [Quantized caches](guides/quantization.md).",
        (
            "kvshard.update_with_stats",
            "kvshard.SaturationCounts",
            "kvshard.calibrate_scales",
            ("kvshard.quant", ("quantize", "dequantize", "saturated", "finite_range")),
        ),
    ),
    (
        "Host-side bookkeeping",
        "",
        (
            "kvshard.PageAllocator",
            "kvshard.allocator.sliding_window_pages",
            "kvshard.allocator.unified_group_page_sizes",
            "kvshard.allocator.PagesStored",
            "kvshard.allocator.PagesRemoved",
            "kvshard.allocator.AllPagesCleared",
            "kvshard.OutOfPages",
            "kvshard.UnknownRequest",
            "kvshard.NULL_PAGE",
        ),
    ),
    (
        "Step metadata",
        "",
        (
            "kvshard.StepMetadata",
            "kvshard.StepGeometry",
            "kvshard.build_step",
            "kvshard.stack_steps",
            "kvshard.build_update_slices",
            "kvshard.pad_slices",
            "kvshard.padded_num_slices",
            "kvshard.token_buckets",
            "kvshard.padded_token_count",
        ),
    ),
    (
        "Scheduling",
        "Continuous batching over a `PageAllocator`; see [A serving loop with the "
        "Scheduler](guides/scheduler.md).",
        (
            "kvshard.Scheduler",
            "kvshard.SchedulerConfig",
            "kvshard.GenerationRequest",
            "kvshard.SchedulerOutput",
            "kvshard.FinishedRequest",
        ),
    ),
    ("Several hosts", "", ("kvshard.distributed",)),
    ("Kernels", "", ("kvshard.kernels",)),
    ("Reference oracle", "", ("kvshard.reference",)),
    ("Testing strategies", "Needs the `test` extra (Hypothesis).", ("kvshard.testing",)),
    (
        "Models (`kvshard.models`, needs flax)",
        "See [Models](models.md).",
        (
            "kvshard.models.read_architecture",
            "kvshard.models.Architecture",
            "kvshard.models.load_checkpoint",
            "kvshard.models.CausalLM",
            "kvshard.models.serve",
            "kvshard.models.serve_step",
            "kvshard.models.dense_logits",
        ),
    ),
    (
        "Serving over HTTP (`kvshard.server`, needs the serve extra)",
        "See [Serving over HTTP](guides/serve.md).",
        (
            "kvshard.server.engine.Engine",
            "kvshard.server.engine.SamplingParams",
            "kvshard.server.sampling.sample_tokens",
            "kvshard.server.sampling.sample_rows",
            "kvshard.server.loop.EngineLoop",
            "kvshard.server.app.create_app",
        ),
    ),
)

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|mod|exc|obj):`~?([^`]+)`")
_WIDTH = 96


# -- reading the source ----------------------------------------------------------------------


def _module_path(module: str) -> Path:
    parts = module.split(".")[1:]
    package = PACKAGE.joinpath(*parts, "__init__.py")
    return package if package.exists() else PACKAGE.joinpath(*parts).with_suffix(".py")


def _is_module(dotted: str) -> bool:
    parts = dotted.split(".")[1:]
    return (
        PACKAGE.joinpath(*parts, "__init__.py").exists()
        or PACKAGE.joinpath(*parts).with_suffix(".py").exists()
    )


@functools.cache
def _source(module: str) -> tuple[ast.Module, str]:
    text = _module_path(module).read_text(encoding="utf-8")
    return ast.parse(text), text


def _statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """A module's top-level statements, those inside ``if``/``try`` blocks included (but not
    ``if TYPE_CHECKING:``, whose imports only mirror the lazy ones)."""
    for node in body:
        if isinstance(node, ast.If):
            if "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            yield from _statements(node.body)
            yield from _statements(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody):
                yield from _statements(block)
            for handler in node.handlers:
                yield from _statements(handler.body)
        else:
            yield node


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if _module_path(module).name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _assigned(node: ast.stmt) -> list[str]:
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def _lazy_exports(module: str) -> dict[str, str | None]:
    """A package's ``_EXPORTS`` table (name -> defining module; None for a submodule)."""
    for node in _statements(_source(module)[0].body):
        if "_EXPORTS" in _assigned(node) and isinstance(node, ast.Assign | ast.AnnAssign):
            assert node.value is not None
            return dict(ast.literal_eval(node.value))
    return {}


@functools.cache
def _find(module: str, name: str) -> tuple[str, ast.stmt, ast.stmt | None]:
    """(defining module, definition, the statement after it) of ``module.name``."""
    lazy = _lazy_exports(module)
    if name in lazy:
        target = lazy[name]
        if target is None:
            raise LookupError(f"{module}.{name} is a module")
        return _find(target, name)
    statements = list(_statements(_source(module)[0].body))
    for i, node in enumerate(statements):
        following = statements[i + 1] if i + 1 < len(statements) else None
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if node.name == name:
                return module, node, following
        elif name in _assigned(node):
            return module, node, following
    for node in statements:
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    source = _absolute(module, node)
                    if _is_module(f"{source}.{alias.name}"):
                        raise LookupError(f"{module}.{name} is a module")
                    return _find(source, alias.name)
    raise LookupError(f"{name!r} is not defined in {module}")


def _module_all(module: str) -> list[str] | None:
    for node in _statements(_source(module)[0].body):
        if "__all__" in _assigned(node) and isinstance(node, ast.Assign | ast.AnnAssign):
            assert node.value is not None
            try:
                return list(ast.literal_eval(node.value))
            except ValueError:  # built, not literal (kvshard's own, from its lazy table)
                return None
    return None


# -- rendering -------------------------------------------------------------------------------


@functools.cache
def _encoded_lines(module: str) -> list[bytes]:
    # ast's column offsets count UTF-8 bytes.
    return [line.encode() for line in re.split(r"(?<=\n)", _source(module)[1])]


def _segment(module: str, node: ast.AST) -> str:
    """``ast.get_source_segment`` on lines split once per module (it splits the whole file on
    every call)."""
    lines = _encoded_lines(module)
    first, last = node.lineno - 1, node.end_lineno - 1  # type: ignore[attr-defined]
    start, end = node.col_offset, node.end_col_offset  # type: ignore[attr-defined]
    if first == last:
        return lines[first][start:end].decode()
    return b"".join([lines[first][start:], *lines[first + 1 : last], lines[last][:end]]).decode()


def _text(module: str, node: ast.AST | None) -> str:
    """The source text of ``node``, on one line (the author's spelling on every Python)."""
    if node is None:
        return ""
    segment = _segment(module, node) or ast.unparse(node)
    return re.sub(r"\s*\n\s*", " ", segment).replace("( ", "(").replace(" )", ")")


def _first_paragraph(doc: str | None) -> str:
    if not doc:
        return ""
    paragraph = inspect.cleandoc(doc).split("\n\n")[0]
    return _ROLE.sub(r"`\1`", paragraph).strip()


def _docstring(node: ast.AST, following: ast.stmt | None) -> str:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return _first_paragraph(ast.get_docstring(node))
    if (
        isinstance(following, ast.Expr)
        and isinstance(following.value, ast.Constant)
        and isinstance(following.value.value, str)
    ):
        return _first_paragraph(following.value.value)
    return ""


def _parameters(module: str, args: ast.arguments, skip_first: bool) -> list[str]:
    positional = [*args.posonlyargs, *args.args]
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(args.defaults))
    defaults += list(args.defaults)
    out: list[str] = []

    def one(arg: ast.arg, default: ast.expr | None) -> str:
        text = arg.arg
        if arg.annotation is not None:
            text += f": {_text(module, arg.annotation)}"
        if default is not None:
            text += (" = " if arg.annotation is not None else "=") + _text(module, default)
        return text

    for i, (arg, default) in enumerate(zip(positional, defaults, strict=True)):
        if i == 0 and skip_first:
            continue
        out.append(one(arg, default))
        if args.posonlyargs and arg is args.posonlyargs[-1]:
            out.append("/")
    if args.vararg is not None:
        out.append("*" + one(args.vararg, None))
    elif args.kwonlyargs:
        out.append("*")
    for arg, kw_default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        out.append(one(arg, kw_default))
    if args.kwarg is not None:
        out.append("**" + one(args.kwarg, None))
    return out


def _call(name: str, parameters: list[str], returns: str = "") -> str:
    tail = f" -> {returns}" if returns else ""
    line = f"{name}({', '.join(parameters)}){tail}"
    if len(line) <= _WIDTH:
        return line
    inner = "".join(f"    {p},\n" for p in parameters)
    return f"{name}(\n{inner}){tail}"


def _decorators(module: str, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> str:
    return " ".join(_text(module, d) for d in node.decorator_list)


def _function(module: str, node: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> str:
    decorators = _decorators(module, node)
    returns = _text(module, node.returns)
    if any(d.endswith("property") for d in decorators.split()):
        return f"property {node.name}" + (f": {returns}" if returns else "")
    skip_first = method and "staticmethod" not in decorators.split()
    parameters = _parameters(module, node.args, skip_first)
    prefix = "classmethod " if "classmethod" in decorators.split() else ""
    return prefix + _call(node.name, parameters, returns)


def _bases(module: str, node: ast.ClassDef) -> Iterator[tuple[str, ast.ClassDef]]:
    """The classes ``node`` derives from that kvshard defines, depth first."""
    for base in node.bases:
        if not isinstance(base, ast.Name):
            continue
        try:
            where, found, _ = _find(module, base.id)
        except LookupError:
            continue
        if isinstance(found, ast.ClassDef):
            yield where, found
            yield from _bases(where, found)


def _fields(module: str, node: ast.ClassDef) -> list[str]:
    """Constructor parameters of a dataclass or NamedTuple: its annotated class attributes."""
    keyword_only = "kw_only=True" in _decorators(module, node).replace(" ", "")
    out = ["*"] if keyword_only else []
    for statement in node.body:
        if not isinstance(statement, ast.AnnAssign) or not isinstance(statement.target, ast.Name):
            continue
        annotation = _text(module, statement.annotation)
        if "ClassVar" in annotation or annotation in ("KW_ONLY", "dataclasses.KW_ONLY"):
            if "KW_ONLY" in annotation:
                out.append("*")
            continue
        text = f"{statement.target.id}: {annotation}"
        value = statement.value
        if isinstance(value, ast.Call) and _text(module, value.func).endswith("field"):
            keywords = {k.arg: k.value for k in value.keywords}
            if "init" in keywords and _text(module, keywords["init"]) == "False":
                continue
            if "default" in keywords:
                text += f" = {_text(module, keywords['default'])}"
            elif "default_factory" in keywords:
                text += f" = <{_text(module, keywords['default_factory'])}()>"
        elif value is not None:
            text += f" = {_text(module, value)}"
        out.append(text)
    return out


def _class_signature(module: str, node: ast.ClassDef) -> str:
    decorators = _decorators(module, node)
    bases = [_text(module, b) for b in node.bases]
    for where, cls in [(module, node), *_bases(module, node)]:
        for statement in cls.body:
            if isinstance(statement, ast.FunctionDef) and statement.name == "__init__":
                return "class " + _call(node.name, _parameters(where, statement.args, True))
    if "dataclass" in decorators or "NamedTuple" in bases:
        inherited = [
            field
            for where, cls in reversed(list(_bases(module, node)))
            if "dataclass" in _decorators(where, cls)
            for field in _fields(where, cls)
        ]
        return "class " + _call(node.name, inherited + _fields(module, node))
    return f"class {node.name}" + (f"({', '.join(bases)})" if bases else "")


def _members(
    module: str, node: ast.ClassDef
) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Public methods and properties of a class and of the kvshard classes it derives from."""
    seen: set[str] = set()
    for where, cls in [(module, node), *_bases(module, node)]:
        for statement in cls.body:
            if not isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if statement.name.startswith("_") or statement.name in seen:
                continue
            seen.add(statement.name)
            yield where, statement


def _entry(lines: list[str], anchor: str, title: str, signature: str, doc: str, level: int) -> None:
    lines += [f'{"#" * level} <a id="{anchor}"></a>`{title}`', ""]
    if signature:
        lines += ["```python", signature, "```", ""]
    if doc:
        lines += [doc, ""]


def _definition(lines: list[str], public: str, level: int) -> None:
    owner, _, name = public.rpartition(".")
    module, node, following = _find(owner, name)
    if isinstance(node, ast.ClassDef):
        signature = _class_signature(module, node)
    elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        signature = _function(module, node, method=False)
    else:
        assert isinstance(node, ast.Assign | ast.AnnAssign)
        signature = f"{name} = {_text(module, node.value)}"
    _entry(lines, public, public, signature, _docstring(node, following), level)
    if isinstance(node, ast.ClassDef):
        for where, member in _members(module, node):
            _entry(
                lines,
                f"{public}.{member.name}",
                f"{name}.{member.name}",
                _function(where, member, method=True),
                _docstring(member, None),
                level + 1,
            )


def _module(lines: list[str], module: str, members: tuple[str, ...] | None) -> None:
    tree = _source(module)[0]
    _entry(lines, module, module, "", _first_paragraph(ast.get_docstring(tree)), 3)
    if members is None:
        members = tuple(_module_all(module) or ())
    if not members:  # no __all__: the public classes and functions the module defines
        members = tuple(
            node.name
            for node in _statements(tree.body)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            and not node.name.startswith("_")
        )
    for name in members:
        _definition(lines, f"{module}.{name}", 4)


def _defines(public: str) -> bool:
    """Whether ``public`` names a definition (a package attribute that shadows its submodule of
    the same name, as ``kvshard.models.serve``, is the definition), not a module."""
    owner, _, name = public.rpartition(".")
    try:
        _find(owner, name)
    except LookupError:
        if not _is_module(public):
            raise
        return False
    return True


def _public_names() -> list[str]:
    """``kvshard.__all__``, read from the source like the rest."""
    names = _module_all("kvshard")
    if names is not None:
        return names
    # kvshard/__init__.py builds __all__ from its lazy table
    return ["__version__", *sorted(_lazy_exports("kvshard"))]


def render() -> str:
    """The text of docs/api.md."""
    documented = {"kvshard.__version__"}
    for _, _, entries in SECTIONS:
        for entry in entries:
            documented.add(entry if isinstance(entry, str) else entry[0])
    missing = [n for n in _public_names() if f"kvshard.{n}" not in documented]
    if missing:
        raise LookupError(f"kvshard._api_doc.SECTIONS places no entry for {missing}")
    lines = [
        "# API reference",
        "",
        f"<!-- Generated by `{REGENERATE}` from the docstrings: do not edit by hand. -->",
        "",
        "Everything below is importable from `kvshard` unless its heading says otherwise; "
        "`kvshard.__version__` is the installed version. Each entry gives the signature and the "
        "first paragraph of the docstring; `help(kvshard.<name>)` prints the whole docstring.",
        "",
        _first_paragraph(ast.get_docstring(_source("kvshard")[0])),
        "",
    ]
    for heading, text, entries in SECTIONS:
        lines += [f"## {heading}", ""]
        if text:
            lines += [text, ""]
        for entry in entries:
            public, members = (entry, None) if isinstance(entry, str) else entry
            if _defines(public):
                _definition(lines, public, 3)
            else:
                _module(lines, public, members)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in args:
        if API_MD.read_text(encoding="utf-8") != text:
            print(f"{API_MD} is stale: run `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    API_MD.write_text(text, encoding="utf-8")
    print(f"wrote {API_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
