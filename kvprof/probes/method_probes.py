"""Hooks that cost (almost) nothing: a method's own code with recording statements first.

A hook on the frontend's request path runs for every request, and one on
``OutputProcessor.process_outputs`` for every engine step, so how a hook is put in matters
as much as what it records (bench/api_overhead.py measures it). ``method_probe`` picks the
cheapest faithful way of the three described below; each falls back to the next, and the
last always works. Ground floor of the probes: it knows nothing of vLLM.
"""

from __future__ import annotations
import __future__

import ast
import asyncio
import builtins
import functools
import inspect
import itertools
import logging
import operator
import textwrap
from collections.abc import Callable
from types import CodeType
from typing import Any

log = logging.getLogger(__name__)

# How a method hook is put in, cheapest first:
#
# 1. a copy of vLLM's own function, compiled from its source with the recording statements
#    first (with_prologue). No frame of ours and no second call per call: process_outputs
#    runs every engine step, and vLLM calls it with a keyword argument, which a wrapper would
#    take through the interpreter's slow path once more (about 70 ns a step). The copy is made
#    only when compiling the unchanged source gives exactly the code vLLM runs (so the file
#    on disk is the one loaded, and nothing about the function depends on where it was
#    defined); its defaults, annotations and globals are the original's own objects.
# 2. else a function with the original's own parameters that records, then calls it
#    (forwarding_probe), with the recording statements inlined when they can be;
# 3. else a generic (*args, **kwargs) wrapper.
#
# The recording statements are the body of a plain function (api_hooks._on_add_request,
# _on_handoff, _on_outputs; see _record_body): its parameters become the hooked
# function's arguments, and every other name they use is renamed with this prefix, so that
# nothing they assign or read can meet a name of the function they are put into.
_SHELL_PREFIX = "_kvprof_"
_CO_NESTED = inspect.CO_NESTED
_COPIES = itertools.count(1)  # names the values of each copy's recording statements apart
# The `from __future__` flags a code object carries (its module's), which compile() takes.
_FUTURE_FLAGS = functools.reduce(
    operator.or_, (getattr(__future__, f).compiler_flag for f in __future__.all_feature_names))


def _pick(params: list[inspect.Parameter], wants: tuple[tuple[str, int | None], ...]
          ) -> list[str]:
    """The argument names to record: by name where ``params`` has it, else by position
    (self is 0), else "None"."""
    kind = inspect.Parameter
    positional = [p.name for p in params
                  if p.kind in (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD)]
    names = {p.name for p in params
             if p.kind not in (kind.VAR_POSITIONAL, kind.VAR_KEYWORD)}
    return [name if name in names else
            positional[pos] if pos is not None and pos < len(positional) else "None"
            for name, pos in wants]


def _record_body(record: Callable[..., None], args: list[str], prefix: str = _SHELL_PREFIX
                 ) -> tuple[list[ast.stmt], dict[str, Any]] | None:
    """The body of the function ``record`` as statements to put into a hooked function: its
    parameters read as ``args`` (names of the hooked function's arguments, or "None"), every
    other name renamed with ``prefix``. Also the values, taken now, of the names it reads
    from its module or the builtins, under their new names: module state the hooks share
    is mutated in place, never rebound. None when that is not safe: no source, a ``return``
    (it would return from the hooked function), a nested scope or scope statement."""
    try:
        fn = ast.parse(textwrap.dedent(inspect.getsource(record))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    a = fn.args if isinstance(fn, ast.FunctionDef) else None
    if (a is None or fn.decorator_list or len(a.args) != len(args) or a.vararg or a.kwarg
            or a.kwonlyargs or a.posonlyargs):
        return None
    own = {p.arg: arg for p, arg in zip(a.args, args, strict=True)}
    nodes = [n for stmt in fn.body for n in ast.walk(stmt)]
    if any(isinstance(n, (ast.Return, ast.Global, ast.Nonlocal, ast.Yield, ast.YieldFrom,
                          ast.Await, ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda,
                          ast.ClassDef, ast.ListComp, ast.SetComp, ast.DictComp,
                          ast.GeneratorExp))
           for n in nodes):
        return None
    values: dict[str, Any] = {}
    module = getattr(record, "__globals__", {})
    for n in nodes:
        if (isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id not in own
                and not any(isinstance(m, ast.Name) and m.id == n.id
                            and isinstance(m.ctx, ast.Store) for m in nodes)):
            if n.id in module:
                values[prefix + n.id] = module[n.id]
            elif hasattr(builtins, n.id):
                values[prefix + n.id] = getattr(builtins, n.id)
            else:
                return None

    class Rename(ast.NodeTransformer):
        def visit_Name(self, node: ast.Name) -> ast.AST:
            if node.id in own:
                value = own[node.id]
                return ast.copy_location(
                    ast.Constant(None) if value == "None" else ast.Name(value, ast.Load()),
                    node)
            node.id = prefix + node.id
            return node

        def visit_ExceptHandler(self, node: ast.ExceptHandler) -> ast.AST:
            if node.name:
                node.name = prefix + node.name
            return self.generic_visit(node)

    body = [Rename().visit(stmt) for stmt in fn.body
            if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant))]
    return body, values


def _names_of(code: CodeType) -> set[str]:
    names = {*code.co_varnames, *code.co_names, *code.co_cellvars, *code.co_freevars}
    for const in code.co_consts:
        if isinstance(const, CodeType):
            names |= _names_of(const)
    return names


def _same_code(a: CodeType, b: CodeType) -> bool:
    """The same bytecode, names, constants and exception table (not line numbers)."""
    if (a.co_code != b.co_code or a.co_names != b.co_names or a.co_varnames != b.co_varnames
            or a.co_cellvars != b.co_cellvars or a.co_freevars != b.co_freevars
            or a.co_argcount != b.co_argcount or a.co_posonlyargcount != b.co_posonlyargcount
            or a.co_kwonlyargcount != b.co_kwonlyargcount
            # (3.11+; Python 3.10 keeps its exception handlers in the bytecode itself)
            or getattr(a, "co_exceptiontable", b"") != getattr(b, "co_exceptiontable", b"")
            or (a.co_flags & ~_CO_NESTED) != (b.co_flags & ~_CO_NESTED)
            or len(a.co_consts) != len(b.co_consts)):
        return False
    for x, y in zip(a.co_consts, b.co_consts, strict=True):
        if isinstance(x, CodeType) or isinstance(y, CodeType):
            if not (isinstance(x, CodeType) and isinstance(y, CodeType) and _same_code(x, y)):
                return False
        elif type(x) is not type(y) or x != y:
            return False
    return True


@functools.lru_cache(maxsize=32)
def _module_imports(filename: str) -> tuple[str, ...] | None:
    """The names a module's top level binds by import. The compiler loads ``name.f`` in a
    call as an attribute, not a method, when ``name`` is one of them, so a function compiled
    again outside its module must be told them to come out the same."""
    try:
        with open(filename, "rb") as fh:
            tree = ast.parse(fh.read())
    except (OSError, SyntaxError, ValueError):
        return None
    names: set[str] = set()
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update(alias.asname or alias.name.split(".")[0] for alias in node.names
                         if alias.name != "*")
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                   ast.Lambda, ast.expr)):
            stack.extend(ast.iter_child_nodes(node))
    return tuple(sorted(names))


def _compile_alone(node: ast.stmt, code: CodeType) -> CodeType:
    """``node`` compiled as its module would, for the function whose code is ``code``: the
    module's future flags, and its imported names declared (in a block never run)."""
    imports = _module_imports(code.co_filename)
    if imports is None:
        raise ValueError("the module's source cannot be read")
    body: list[ast.stmt] = [node]
    if imports:
        body.insert(0, ast.If(ast.Constant(0), [ast.Import(
            [ast.alias("_", name) for name in imports])], []))
    module = ast.fix_missing_locations(ast.Module(body, []))
    return compile(module, code.co_filename, "exec", flags=code.co_flags & _FUTURE_FLAGS,
                   dont_inherit=True)


def with_prologue(wrapped: Callable[..., Any], record: Callable[..., None],
                   wants: tuple[tuple[str, int | None], ...],
                   only_if: object = True) -> Callable[..., Any] | None:
    """A copy of the function ``wrapped`` that first runs ``record``'s body with some of its
    arguments (only while ``only_if`` is true), see the note above; None when a faithful
    copy cannot be made."""
    code = getattr(wrapped, "__code__", None)
    if not isinstance(code, CodeType) or wrapped.__closure__ or code.co_freevars:
        return None  # a closure, or a method using super(): its cells cannot be copied
    try:
        lines, first = inspect.getsourcelines(wrapped)
        if lines[0][:1].isspace():
            # A method: parsed inside a block as indented as it is (dedenting the text would
            # change its docstring), one line up.
            fn = ast.parse("if 1:\n" + "".join(lines)).body[0].body[0]
            first -= 1
        else:
            fn = ast.parse("".join(lines)).body[0]
        params = list(inspect.signature(wrapped, follow_wrapped=False).parameters.values())
    except (OSError, TypeError, ValueError, SyntaxError, IndexError, AttributeError):
        return None
    if (not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
            or fn.name != code.co_name
            or any(n.startswith(_SHELL_PREFIX) for n in _names_of(code))):
        return None
    # Defaults and annotations are the original's objects, set below, not evaluated again.
    fn.decorator_list, fn.returns = [], None
    fn.args.defaults, fn.args.kw_defaults = [], [None] * len(fn.args.kw_defaults)
    for arg in (*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs,
                fn.args.vararg, fn.args.kwarg):
        if arg is not None:
            arg.annotation = None
    ast.increment_lineno(fn, first - 1)  # tracebacks show the original file's lines
    try:
        plain = _compile_alone(fn, code)
    except (SyntaxError, ValueError):
        return None
    copied = next((c for c in plain.co_consts
                   if isinstance(c, CodeType) and c.co_name == code.co_name), None)
    if copied is None or not _same_code(copied, code):
        return None  # the source on disk is not what runs, or depends on where it sat
    # The names the recording statements read are globals of vLLM's module, put there
    # under names of this copy's own (so two hooks in one module never share one): as
    # closure cells, every call would copy them into its frame and clear them after, which
    # for a hook on every streamed message or engine step costs more than its statements.
    prefix = f"{_SHELL_PREFIX}{next(_COPIES)}_"
    made = _record_body(record, _pick(params, wants), prefix)
    if made is None:
        return None
    statements, values = made
    if only_if is not True:  # a gate whose truth may change: tested on every call
        values[prefix + "only_if"] = only_if
        statements = [ast.If(ast.Name(prefix + "only_if", ast.Load()), statements, [])]
    docstring = (1 if fn.body and isinstance(fn.body[0], ast.Expr)
                 and isinstance(fn.body[0].value, ast.Constant)
                 and isinstance(fn.body[0].value.value, str) else 0)
    for stmt in statements:  # the recording statements show as the def line
        for node in ast.walk(stmt):
            if "lineno" in node._attributes:
                node.lineno = node.end_lineno = fn.lineno
                node.col_offset = node.end_col_offset = 0
    fn.body[docstring:docstring] = statements
    # Defined in the namespace of vLLM's module (the copy's own statements read it as
    # before), kept out of it: only the values above go in.
    namespace: dict[str, Any] = {}
    try:
        compiled = _compile_alone(fn, code)
    except (SyntaxError, ValueError):
        return None
    wrapped.__globals__.update(values)
    exec(compiled, wrapped.__globals__, namespace)
    copy = namespace[fn.name]
    copy.__kvprof_globals__ = (wrapped.__globals__, tuple(values))  # see remove_globals
    if hasattr(code, "co_qualname"):  # Python 3.11+
        copy.__code__ = copy.__code__.replace(co_qualname=code.co_qualname)
    copy.__qualname__ = wrapped.__qualname__
    copy.__defaults__, copy.__kwdefaults__ = wrapped.__defaults__, wrapped.__kwdefaults__
    copy.__annotations__ = getattr(wrapped, "__annotations__", {})
    return copy


def remove_globals(probe: Any) -> None:
    """Take the values a copy's recording statements read out of vLLM's module again (the
    copy is no longer in place)."""
    module, names = getattr(getattr(probe, "__func__", probe), "__kvprof_globals__", ({}, ()))
    for name in names:
        module.pop(name, None)


def forwarding_probe(wrapped: Callable[..., Any], record: Callable[..., None],
                      wants: tuple[tuple[str, int | None], ...],
                      only_if: object = True, inline: bool = False) -> Callable[..., Any]:
    """A function with ``wrapped``'s own parameters that runs ``record`` with some of its
    arguments (only while ``only_if``, an object whose truth may change, is true), then
    returns ``wrapped(...)`` with all of them passed on as they came.

    ``wants``: (parameter name, position counting self as 0) per argument ``record`` takes;
    the name when ``wrapped`` has it (vLLM versions move parameters), else the position,
    else None. Generated once at install because a ``(*args, **kwargs)`` probe costs every
    call a tuple, a dict and two trips through the C call machinery, where a mirrored
    signature lets the interpreter run the probe and the original inline (about 0.2 us a
    hook on the frontend's request path, bench/api_overhead.py). ``inline``: ``record``'s
    body goes into the probe (_record_body), one frame fewer; when it cannot, it is called.
    What it cannot mirror gets a generic probe."""
    try:
        params = list(inspect.signature(wrapped, follow_wrapped=False).parameters.values())
    except (TypeError, ValueError):
        params = None
    if params is None or any(p.name.startswith(_SHELL_PREFIX) for p in params):
        log.warning("kvprof: cannot mirror the parameters of %r; its hook records only "
                    "keyword arguments", wrapped)

        def generic(*args, **kwargs):
            if only_if:
                record(*(kwargs.get(name) for name, _ in wants))
            return wrapped(*args, **kwargs)
        return generic
    kind = inspect.Parameter
    head: list[str] = []
    call: list[str] = []
    defaults: list[Any] = []
    star = False
    for i, p in enumerate(params):
        text = p.name
        if p.default is not p.empty:
            text += f"=_kvprof_defaults[{len(defaults)}]"
            defaults.append(p.default)
        if p.kind is kind.VAR_POSITIONAL:
            head.append("*" + p.name)
            call.append("*" + p.name)
            star = True
        elif p.kind is kind.VAR_KEYWORD:
            head.append("**" + p.name)
            call.append("**" + p.name)
        elif p.kind is kind.KEYWORD_ONLY:
            if not star:
                head.append("*")
                star = True
            head.append(text)
            call.append(f"{p.name}={p.name}")
        else:
            head.append(text)
            call.append(p.name)
            if p.kind is kind.POSITIONAL_ONLY and (
                    i + 1 == len(params) or params[i + 1].kind is not kind.POSITIONAL_ONLY):
                head.append("/")
    picked = _pick(params, wants)
    made = _record_body(record, picked) if inline else None
    values: dict[str, Any] = {}
    if made is None:
        lines = [f"_kvprof_record({', '.join(picked)})"]
    else:
        lines = [ast.unparse(ast.fix_missing_locations(stmt)) for stmt in made[0]]
        lines = "\n".join(lines).splitlines()
        values = made[1]
    if only_if is not True:  # a gate whose truth may change: tested on every call
        lines = ["if _kvprof_only_if:"] + ["    " + line for line in lines]
    # A factory whose parameters the probe reads as closure cells (no dictionary lookups).
    source = (f"def _kvprof_make(_kvprof_record, _kvprof_wrapped, _kvprof_defaults, "
              f"_kvprof_only_if, {', '.join(values)}):\n"
              f"    def probe({', '.join(head)}):\n"
              + "".join(f"        {line}\n" for line in lines) +
              f"        return _kvprof_wrapped({', '.join(call)})\n"
              f"    return probe\n")
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<kvprof probe of {getattr(wrapped, '__qualname__', '?')}>",
                 "exec"), {}, namespace)
    return namespace["_kvprof_make"](record, wrapped, tuple(defaults), only_if,
                                     *values.values())


def method_probe(wrapped: Callable[..., Any], record: Callable[..., None],
                  wants: tuple[tuple[str, int | None], ...],
                  only_if: object = True) -> Callable[..., Any]:
    """The cheapest faithful hook of the three (see the note above)."""
    copy = with_prologue(wrapped, record, wants, only_if)
    if copy is not None:
        return copy
    probe = forwarding_probe(wrapped, record, wants, only_if, inline=True)
    if inspect.iscoroutinefunction(wrapped):
        probe = _as_coroutine_function(probe)
    return probe


def _as_coroutine_function(func: Callable[..., Any]) -> Callable[..., Any]:
    """Keep ``inspect.iscoroutinefunction`` true for a probe that returns the original's
    coroutine (code that checks it before awaiting sees what it saw before)."""
    mark = getattr(inspect, "markcoroutinefunction", None)  # Python >= 3.12
    if mark is not None:
        return mark(func)
    func._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]
    return func
