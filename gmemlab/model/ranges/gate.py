"""May a batched path stand in for the code a machine runs?  Code identity, at run time.

Each batched path (``gmemlab.model.ranges``) is a numpy re-statement of a
kernel loop: the guest's and the VMM's first touch, truncation, the stage-2
and PTE zaps, fallocate (:data:`PATH_LOOPS`), with everything the loop's body
reaches, v12's or mainline's design code included.  ``tests/scale`` holds each
to that code, event for event and state for state.  That proof is worth
something only for the code it was made on, so the paths carry *pins*: per
mirrored design and path, the digest of every function the path stands for
(:mod:`.pins`).  Before a machine lets a path run, it computes the same
:func:`closure` over the code actually in front of it (the design's methods as
they resolve on the instance, so a subclass, a ``--design-file`` or a test's
monkeypatch shows; the shared kernel functions as the module globals hold them
now) and compares:

* the closure equals a pinned one (a design of ``ranges.MIRRORS``: v12, base,
  noflush, filemap): the path runs batched, mirroring that design;
* anything differs: that loop runs its per-page body, and :class:`Gate` says
  which functions differ, for reports to print.

So ``falloc``, which changes only ``kvm_gmem_allocate``, runs every other loop
batched; a design that changes the zap runs its faults per page and its
truncation batched, if its free path is v12's.

A function's digest is that of its source with docstrings removed, as the AST
gives it back (``ast.unparse``): comments, docstrings and layout do not count,
any change to what the code does does.  Functions whose source cannot be read
(generated ones) count by their bytecode.

``python -m gmemlab.model.ranges.pin --write`` rewrites the pins after a change
that the batched paths were brought in line with (``tests/scale`` passing).
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import itertools
import marshal
import pkgutil
import textwrap
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import CodeType, FunctionType, ModuleType
from typing import Any

from gmemlab.model.designs import Design, get_design
from gmemlab.model.ranges import MIRRORS, pins

# What a design says about itself, not what it does.
DESCRIPTIVE = frozenset({"name", "title", "source", "describe"})
# Shared modules whose code the batched paths re-state: the model's kernel code, minus the
# batched paths themselves, the designs other than mainline, and the API layer above.
SHARED_PACKAGE = "gmemlab.model"
NOT_SHARED = ("gmemlab.model.ranges", "gmemlab.model.designs", "gmemlab.model.host")
SHARED_EXTRA = ("gmemlab.model.designs.base", "gmemlab.guest")
PINNED_DESIGNS = tuple(MIRRORS)
# The kernel loops each batched path stands in for: the functions whose loop heads call
# ``m.ranges.<path>``.  The path re-states them and everything they reach.
PATH_LOOPS: dict[str, tuple[str, ...]] = {
    "guest_access": ("gmemlab.model.kvm.vcpu:_run_touch", "gmemlab.model.kvm.vcpu:_run_range"),
    "user_access": ("gmemlab.model.mm.memory:walk_user",),
    "unmap_gfn_range": ("gmemlab.model.kvm.kvm_main:Kvm.unmap_gfn_range",),
    "truncate": ("gmemlab.model.mm.truncate:truncate_inode_pages_range",),
    "zap_user_range": ("gmemlab.model.mm.memory:do_munmap",),
    "allocate": ("gmemlab.model.kvm.guest_memfd:kvm_gmem_allocate",),
}
# Callbacks kernel code stores in a slot and calls through it later, so that no name in the
# calling code says which: ``vma->vm_ops->fault`` (set by each file's ->mmap).  Meeting the
# slot's name, a closure takes in every function that is ever stored there.
CALLBACK_SLOTS: dict[str, tuple[str, ...]] = {
    "fault": ("design:kvm_gmem_fault_user_mapping", "design:secretmem_fault",
              "gmemlab.model.mm.shmem:shmem_fault"),
}

_digests: dict[object, str] = {}  # code object -> digest, for the life of the process


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Module):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def function_digest(func: Callable[..., Any]) -> str:
    """The digest of what ``func`` does: its source without docstrings, normalised."""
    code = getattr(func, "__code__", None)
    key: object = code if code is not None else func
    hit = _digests.get(key)
    if hit is not None:
        return hit
    try:
        source = textwrap.dedent(inspect.getsource(func))
        text = ast.unparse(_strip_docstrings(ast.parse(source)))
        defaults = getattr(func, "__defaults__", None)
        if defaults:
            text += f"\n#defaults {defaults!r}"
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    except (OSError, TypeError, SyntaxError):
        # Generated code (dataclass methods, exec): its bytecode, stable within a Python version.
        raw = marshal.dumps(code) if code is not None else repr(func).encode()
        digest = "unsourced:" + hashlib.sha256(raw).hexdigest()[:16]
    _digests[key] = digest
    return digest


def _value_digest(value: object) -> str | None:
    """A class attribute's digest: code for callables and properties, repr for plain data."""
    if isinstance(value, staticmethod | classmethod):
        value = value.__func__
    if isinstance(value, property):
        parts = [function_digest(f) for f in (value.fget, value.fset) if f is not None]
        return "property:" + ",".join(parts)
    if inspect.ismethod(value):
        value = value.__func__
    if isinstance(value, FunctionType):
        return function_digest(value)
    if value is None or isinstance(value, bool | int | float | str | tuple | frozenset):
        return "value:" + repr(value)
    return None  # objects the design holds (state), judged by the instance's own fields


_modules: list[ModuleType] = []


def _shared_modules() -> list[ModuleType]:
    """The model's kernel modules (their list is fixed once the package is imported)."""
    if not _modules:
        pkg = importlib.import_module(SHARED_PACKAGE)
        names = sorted(info.name for info in pkgutil.walk_packages(pkg.__path__, SHARED_PACKAGE + "."))
        _modules.extend(importlib.import_module(n) for n in names if not n.startswith(NOT_SHARED))
        _modules.extend(importlib.import_module(n) for n in SHARED_EXTRA)
    return _modules


def _callables(raw: object) -> list[Callable[..., Any]]:
    if isinstance(raw, staticmethod | classmethod):
        raw = raw.__func__
    if isinstance(raw, FunctionType):
        return [raw]
    if isinstance(raw, property):
        return [f for f in (raw.fget, raw.fset) if f is not None]
    return []


def _methods_by_name() -> dict[str, list[tuple[str, Callable[..., Any]]]]:
    """Every method of every class the shared modules define, by attribute name."""
    out: dict[str, list[tuple[str, Callable[..., Any]]]] = {}
    for mod in _shared_modules():
        for cname, cls in vars(mod).items():
            if inspect.isclass(cls) and cls.__module__ == mod.__name__:
                for attr, raw in vars(cls).items():
                    for f in _callables(raw):
                        out.setdefault(attr, []).append((f"{mod.__name__}.{cname}.{attr}", f))
    return out


def _shared_namespaces() -> list[Mapping[str, Any]]:
    """The namespaces a patch of shared code would change: module globals, class dicts."""
    if not _namespaces:
        for mod in _shared_modules():
            _namespaces.append(vars(mod))
            _namespaces.extend(vars(cls) for cls in vars(mod).values()
                               if inspect.isclass(cls) and cls.__module__ == mod.__name__)
    return _namespaces


_namespaces: list[Mapping[str, Any]] = []


def _code_identity(design: Design) -> tuple[object, ...]:
    """Cheap: changes whenever any code :func:`closure` could reach is replaced (a patched
    function, method or design attribute), so a verdict can be reused while it holds."""
    shared = tuple(map(id, itertools.chain.from_iterable(ns.values() for ns in _shared_namespaces())))
    mine = tuple(id(v) for klass in type(design).__mro__ for v in vars(klass).values())
    fields = vars(design) if hasattr(design, "__dict__") else {}
    own = tuple(sorted((k, repr(v) if isinstance(v, bool | int | float | str | type(None)) else id(v))
                       for k, v in fields.items()))
    return hash(shared), type(design), hash(mine), own


def _names_in(code: CodeType) -> Iterator[str]:
    """The global and attribute names ``code`` and the functions nested in it use, and the
    strings that could name one (``getattr(mapping.a_ops, "free_folio", None)``)."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, CodeType):
            yield from _names_in(const)
        elif isinstance(const, str) and const.isidentifier():
            yield const


def closure(roots: tuple[str, ...], design: Design) -> dict[str, str]:
    """What the code reachable from ``roots`` does, function by function, with ``design``.

    From each function: the functions its module globals name (keyed where they
    were found, so a patched alias shows), the design's attributes of any name it
    uses (resolved on the instance: ``m.design.X``, ``self.X``), and every method
    of a shared class with the name of an attribute it uses (``mapping.i_pages.store``
    reaches ``XArray.store``).  That over-approximates the calls, never misses one
    made through these three routes.
    """
    methods = _methods_by_name()
    out: dict[str, str] = {}
    todo: list[tuple[str, Callable[..., Any]]] = []

    def resolve(ref: str) -> tuple[str, Callable[..., Any]]:
        where, _, qual = ref.rpartition(":")
        obj: Any = design if where == "design" else importlib.import_module(where)
        for part in qual.split("."):
            obj = getattr(obj, part)
        return (f"design.{qual}" if where == "design" else ref), getattr(obj, "__func__", obj)

    todo.extend(resolve(root) for root in roots)
    while todo:
        key, func = todo.pop()
        if key in out:
            continue
        out[key] = function_digest(func)
        code = getattr(func, "__code__", None)
        if code is None:
            continue
        glob = getattr(func, "__globals__", {})
        for name in set(_names_in(code)):
            value = glob.get(name)
            if isinstance(value, FunctionType):
                todo.append((f"{glob.get('__name__')}.{name}", value))
            if not name.startswith("__") and name not in DESCRIPTIVE and hasattr(design, name):
                raw = inspect.getattr_static(design, name)
                digest = _value_digest(raw)
                if isinstance(raw, staticmethod | classmethod):
                    raw = raw.__func__
                if isinstance(raw, FunctionType):
                    todo.append((f"design.{name}", raw))
                elif isinstance(raw, property) and raw.fget is not None:
                    todo.append((f"design.{name}", raw.fget))
                else:
                    out[f"design.{name}"] = digest or "object:" + type(raw).__qualname__
            todo.extend(methods.get(name, ()))
            todo.extend(resolve(ref) for ref in CALLBACK_SLOTS.get(name, ()))
    return out


@dataclass(frozen=True, slots=True)
class PathGate:
    """One batched path's verdict: the design whose code it mirrors here, or what differs."""

    path: str
    mirror: str | None  # a pinned design (MIRRORS); None: the loop runs its per-page body
    differs: tuple[str, ...] = ()  # against the nearest pinned design


@dataclass(frozen=True, slots=True)
class Gate:
    """The verdict on one machine's code, path by path."""

    paths: tuple[PathGate, ...]
    asked: str = ""  # why no path may run batched whatever the code ("": none)

    @property
    def mirror(self) -> str | None:
        """The design the batched paths mirror ("v12", "base"...), None if none may run."""
        found = {p.mirror for p in self.paths if p.mirror}
        return None if not found else found.pop() if len(found) == 1 else "+".join(sorted(found))

    @property
    def differs(self) -> tuple[str, ...]:
        return tuple(sorted({d for p in self.paths for d in p.differs}))

    @property
    def reason(self) -> str:
        if self.asked:
            return self.asked
        off = [p for p in self.paths if p.mirror is None]
        if not off:
            return "design code as checked, every path"
        where = ", ".join(p.path for p in off)
        said = f"{where}: not code the batched paths mirror (differs in {_names(list(self.differs))})"
        on = [p.path for p in self.paths if p.mirror]
        return f"per page for {said}" + (f"; batched ({self.mirror}'s code) for {', '.join(on)}"
                                         if on else "")

    def describe(self) -> str:
        """One line for reports: which kernel loops ran batched, and why the others did not."""
        if self.mirror and all(p.mirror for p in self.paths):
            return (f"batched where regular, mirroring {self.mirror}'s per-page code "
                    f"({self.reason})")
        return self.reason if self.mirror else f"per page ({self.reason})"


def path_closures(design: Design) -> dict[str, dict[str, str]]:
    return {path: closure(roots, design) for path, roots in PATH_LOOPS.items()}


_verdicts: dict[tuple[object, ...], Gate] = {}


def judge(design: Design) -> Gate:
    """For each batched path: is the code it stands for, with ``design``, code it mirrors?"""
    key = _code_identity(design)
    hit = _verdicts.get(key)
    if hit is None:
        hit = _verdicts[key] = _judge(design)
    return hit


def _judge(design: Design) -> Gate:
    now = path_closures(design)
    verdicts = []
    order = sorted(PINNED_DESIGNS, key=lambda name: name != design.name)  # its own pin first
    for path, mine in now.items():
        best: tuple[int, str | None, list[str]] = (1 << 30, None, [])
        for pinned in order:
            want = pins.PATHS[pinned].get(path, {})
            diff = sorted(set(mine) ^ set(want) | {k for k in mine.keys() & want.keys()
                                                   if mine[k] != want[k]})
            if not diff:
                best = (0, pinned, [])
                break
            if len(diff) < best[0]:
                best = (len(diff), None, diff)
        verdicts.append(PathGate(path, best[1], tuple(best[2])))
    return Gate(tuple(verdicts))


def _names(names: list[str], most: int = 4) -> str:
    shown = ", ".join(n.removeprefix("gmemlab.model.") for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


PER_PAGE_ASKED = Gate((), asked="per-page paths asked for (range_paths=False)")


def write_pins(path: Path | None = None) -> Path:
    """Rewrite :mod:`.pins` from the code as it is now."""
    path = path or Path(__file__).with_name("pins.py")
    lines = [
        '"""The code the batched paths were checked against (generated: do not edit).',
        "",
        "Per mirrored design and batched path, the digest of every function the path stands",
        "for.  Written by ``python -m gmemlab.model.ranges.pin --write`` once ``tests/scale``",
        "showed the batched paths equal to this code; see :mod:`.gate`.",
        '"""',
        "",
        "PATHS: dict[str, dict[str, dict[str, str]]] = {",
    ]
    for name in PINNED_DESIGNS:
        lines.append(f"    {name!r}: {{")
        for p, fp in path_closures(get_design(name)).items():
            lines.append(f"        {p!r}: {{")
            lines.extend(f"            {k!r}: {v!r}," for k, v in sorted(fp.items()))
            lines.append("        },")
        lines.append("    },")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")
    return path
