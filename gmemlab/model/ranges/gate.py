"""May the batched paths stand in for the code a machine runs?  Code identity, at run time.

The batched paths (``gmemlab.model.ranges``) are numpy re-statements of
per-page kernel code: v12's (or mainline's) guest_memfd paths and the shared
mm/KVM code around them.  ``tests/scale`` holds them equal to that code, event
for event and state for state.  That proof is worth something only for the code
it was made on, so the batched paths carry *pins*: a digest of every function
they were checked against (:mod:`.pins`).  Before a machine lets them run, it
fingerprints the code actually in front of it (the design's methods as they
resolve on the instance, so a subclass, a ``--design-file`` or a test's
monkeypatch shows, and every function of the shared kernel modules as their
module globals hold them now) and compares:

* the shared code and the design's code equal a pinned design (v12 or base):
  the batched paths run, mirroring that design;
* anything differs: the machine runs every page through its per-page path, and
  :class:`Gate` says why (the functions that differ), for reports to print.

A function's digest is that of its source with docstrings removed, as the AST
gives it back (``ast.unparse``): comments, docstrings and layout do not count,
any change to what the code does does.  Functions whose source cannot be read
(built with ``exec``) never match.

``python -m gmemlab.model.ranges.pin`` rewrites the pins after a change
that the batched paths were brought in line with (``tests/scale`` passing).
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import marshal
import pkgutil
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FunctionType, ModuleType
from typing import Any

from gmemlab.model.designs import Design, get_design
from gmemlab.model.ranges import pins

# What a design says about itself, not what it does.
DESCRIPTIVE = frozenset({"name", "title", "source", "describe"})
# Shared modules whose code the batched paths re-state: the model's kernel code, minus the
# batched paths themselves, the designs other than mainline, and the API layer above.
SHARED_PACKAGE = "gmemlab.model"
NOT_SHARED = ("gmemlab.model.ranges", "gmemlab.model.designs", "gmemlab.model.host")
SHARED_EXTRA = ("gmemlab.model.designs.base", "gmemlab.guest")
PINNED_DESIGNS = ("v12", "base")

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


def design_fingerprint(design: Design) -> dict[str, str]:
    """Per attribute of ``design`` (as it resolves on the instance), what it does."""
    out: dict[str, str] = {}
    for name in dir(design):
        if name.startswith("__") or name in DESCRIPTIVE:
            continue
        raw = inspect.getattr_static(design, name)
        digest = _value_digest(raw)
        if digest is None:
            digest = "object:" + type(raw).__qualname__
        out[name] = digest
    return out


def _shared_modules() -> Iterator[ModuleType]:
    pkg = importlib.import_module(SHARED_PACKAGE)
    names = [info.name for info in pkgutil.walk_packages(pkg.__path__, SHARED_PACKAGE + ".")]
    for name in sorted(names):
        if name.startswith(NOT_SHARED):
            continue
        yield importlib.import_module(name)
    for name in SHARED_EXTRA:
        yield importlib.import_module(name)


def shared_fingerprint() -> dict[str, str]:
    """Per function of the shared kernel modules, as their globals hold it now.

    A function counts wherever a shared module's globals hold it, so that a patch
    of ``filemap.truncate_folio`` and one of another module's imported alias are
    both seen; functions of other gmemlab modules (the API, the designs' registry)
    do not, and anything else found there (a test's patch) does.  Methods of the
    classes a module defines count too.
    """
    modules = list(_shared_modules())
    shared = {mod.__name__ for mod in modules}
    out: dict[str, str] = {}
    for mod in modules:
        for name, value in vars(mod).items():
            key = f"{mod.__name__}.{name}"
            if isinstance(value, FunctionType):
                home = value.__module__ or ""
                if home in shared or not home.startswith("gmemlab"):
                    out[key] = function_digest(value)
            elif inspect.isclass(value) and value.__module__ == mod.__name__:
                for attr, raw in vars(value).items():
                    if attr.startswith("__") and attr != "__init__":
                        continue
                    digest = _value_digest(raw)
                    if digest is not None and not digest.startswith("value:"):
                        out[f"{key}.{attr}"] = digest
    return out


@dataclass(frozen=True, slots=True)
class Gate:
    """The verdict on one machine's code: which design the batched paths mirror, or why none."""

    mirror: str | None  # "v12" or "base"; None: every page runs its per-page path
    reason: str
    differs: tuple[str, ...] = ()  # the functions that differ from the pinned code

    @property
    def zaps(self) -> bool:
        """Do the mirrored paths zap NO_DIRECT_MAP folios (v12), or leave the direct map alone?"""
        return self.mirror == "v12"


def _diff(now: dict[str, str], pinned: dict[str, str]) -> list[str]:
    """Names pinned whose code is not the pinned code now (new names do not count:
    code that nothing pinned calls cannot change what pinned code does)."""
    return sorted(k for k, v in pinned.items() if now.get(k) != v)


def judge(design: Design, *, shared: dict[str, str] | None = None) -> Gate:
    """Does ``design``, with the shared code as it is now, equal code the batched paths mirror?"""
    changed = _diff(shared if shared is not None else shared_fingerprint(), pins.SHARED)
    if changed:
        return Gate(None, "the shared kernel code differs from the code the batched paths were "
                          f"checked against ({_names(changed)})", tuple(changed))
    mine = design_fingerprint(design)
    best: tuple[int, str, list[str]] | None = None
    for pinned in PINNED_DESIGNS:
        want = pins.DESIGNS[pinned]
        diff = sorted(set(mine) ^ set(want) | {k for k in mine.keys() & want.keys() if mine[k] != want[k]})
        if not diff:
            same = "" if design.name == pinned else f" ({design.name}'s code is {pinned}'s)"
            return Gate(pinned, f"design code as checked{same}")
        if best is None or len(diff) < len(best[2]):
            best = (len(diff), pinned, diff)
    assert best is not None
    _, nearest, diff = best
    return Gate(None, f"design {design.name!r} is not code the batched paths mirror (nearest: "
                      f"{nearest}, differs in {_names(diff)})", tuple(diff))


def _names(names: list[str], most: int = 4) -> str:
    shown = ", ".join(n.removeprefix("gmemlab.model.") for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


PER_PAGE_ASKED = Gate(None, "per-page paths asked for (range_paths=False)")


def write_pins(path: Path | None = None) -> Path:
    """Rewrite :mod:`.pins` from the code as it is now."""
    path = path or Path(__file__).with_name("pins.py")
    designs = {name: design_fingerprint(get_design(name)) for name in PINNED_DESIGNS}
    lines = [
        '"""The code the batched paths were checked against (generated: do not edit).',
        "",
        "Written by ``python -m gmemlab.model.ranges.pin --write`` once ``tests/scale``",
        "showed the batched paths equal to this code; see :mod:`.gate`.",
        '"""',
        "",
        "SHARED: dict[str, str] = {",
        *(f"    {k!r}: {v!r}," for k, v in sorted(shared_fingerprint().items())),
        "}",
        "",
        "DESIGNS: dict[str, dict[str, str]] = {",
    ]
    for name, fp in designs.items():
        lines.append(f"    {name!r}: {{")
        lines.extend(f"        {k!r}: {v!r}," for k, v in sorted(fp.items()))
        lines.append("    },")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")
    return path
