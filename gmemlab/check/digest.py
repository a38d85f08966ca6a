"""State fingerprints: a digest of the machine plus every actor's progress.

Two schedules that reach the same fingerprint reach the same state, so the
explorer expands it once (state hashing).  That is sound only if the digest
covers everything that can influence what happens next:

* the machine: every field of the memmap (``MEM_NOT_STATE`` left out: a
  lifetime counter for reports, an observer's watch set, a cache of views),
  of the direct map and of the page allocator, the TLBs, locks, fault-injection arms,
  page caches, user page tables, stage-2 tables, memslots and bindings, file,
  inode and VM reference counts, the design's own state (a pool, a pending
  flush batch), and every other attribute of the machine, canonicalised
  generically, so that state a model change adds is covered (or reported as
  an unknown type) rather than silently ignored.  Left out, by name: the
  trace, the invariants' record, the current task, observation hooks and the
  static configuration (``MACHINE_NOT_STATE``).  TLB entries are digested as
  sets: their LRU order only matters at capacity, far beyond these scenarios.
* each actor: its chain of suspended generators (outermost first), and for
  each frame its code position, the names of its bound locals and the values
  of its locals *and value stack*.  The stack holds ``for`` loops' iterators,
  whose remaining items matter as much as any local; ``gc.get_referents`` of a
  generator returns exactly the frame's locals and stack after its fixed
  header (code, names, frame object, function, code).

Objects are named, never identified by ``id()``: every model object the setup
built gets a stable name (``kvm1``, ``slot1.0``, ``file5``, ``as3``...), the
same in every replay of the scenario.  Values are canonicalised recursively;
an object the namer does not know and the canonicaliser cannot take apart is
counted in :attr:`Namer.unknown` (the tests require zero for every standard
scenario) and identified by ``id()``, which may keep equal states apart but
never merges different ones within a run.

Fingerprints are comparable between processes that share the string hash
seed: forked workers inherit it, and Ray actors all start with
``PYTHONHASHSEED`` fixed (``shard.py``), so a sharded search merges their states.
"""

from __future__ import annotations

import gc
import hashlib
from array import array
from collections.abc import Callable, Generator, Iterable
from dataclasses import fields, is_dataclass
from types import (
    BuiltinMethodType,
    CellType,
    CodeType,
    FunctionType,
    GeneratorType,
    MethodDescriptorType,
    MethodType,
    WrapperDescriptorType,
)
from typing import Any, cast

from gmemlab.check.world import World
from gmemlab.model.fs import File, Inode
from gmemlab.model.kvm.guest_memfd import GmemFile
from gmemlab.model.kvm.kvm_main import Kvm
from gmemlab.model.machine import Machine
from gmemlab.model.mm.filemap import AddressSpace
from gmemlab.model.mm.memory import Process
from gmemlab.model.mm.xarray import XArray

# MemMap fields that are not state: the lifetime counter reports use, the exposure
# analysis's watch set, a cache of numpy views of the columns, the frame count.
MEM_NOT_STATE = frozenset({"gen", "taint_watch", "_views", "nr_pages"})
# Machine attributes that are not state: history, observers, fixed at boot, or which code
# paths run (the batched paths and their gate: judged once, never by the checker's tasks).
MACHINE_NOT_STATE = frozenset({"trace", "inv", "current", "step_hook", "config", "profile", "ram",
                               "ranges", "_gate", "_batched"})
# Machine attributes machine() digests in its own way.
_MACHINE_SPECIAL = frozenset({"mem", "dmap", "alloc", "tlb", "locks", "kvms", "mappings", "faults",
                              "design"})
_ATOMS = (int, str, bool, float, bytes)
# Iterators whose __reduce__ gives what is left to iterate (plus their wrappers).
_ITERABLES: tuple[Iterable[Any], ...] = ([], (), range(1), {}, {}.items(), {}.values(), set(), "", b"",
                                         bytearray())
_ITERATOR_TYPES: tuple[type, ...] = (*(type(iter(x)) for x in _ITERABLES),
                                     enumerate, zip, map, filter, reversed)
_code_ids: dict[CodeType, str] = {}
_BUFFERS = (bytearray, array)
_SLOTS: dict[tuple[type, frozenset[str]], tuple[str, ...]] = {}  # per class: the slots to digest


class _DigestNone:
    """None in a digest.  ``hash(None)`` is None's address in Python 3.11, which differs
    between processes not forked from one another (Ray workers); this hashes alike in all."""

    __slots__ = ()

    def __hash__(self) -> int:
        return 0x6E6F6E65

    def __repr__(self) -> str:
        return "None"


NONE = _DigestNone()


def _code_id(code: CodeType) -> str:
    """A name for a function's code that every process gives it alike (sharded searches
    compare fingerprints made in different workers)."""
    cid = _code_ids.get(code)
    if cid is None:
        cid = _code_ids[code] = f"{code.co_filename}:{code.co_firstlineno}:{code.co_qualname}"
    return cid


def _xa(xa: XArray) -> tuple[tuple[int, int], ...]:
    return tuple(xa.items())


class Namer:
    """Stable names for the objects of one execution, and the canonicaliser that uses them."""

    __slots__ = ("_keep", "files", "inodes", "names", "procs", "unknown")

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self._keep: list[tuple[object, str]] = []  # keeps named objects alive: ids stay theirs
        self.unknown: set[str] = set()
        # Named objects whose own fields are state (digested by machine()).
        self.files: list[File] = []
        self.inodes: list[Inode] = []
        self.procs: list[Process] = []

    def name_world(self, w: World, actors: Iterable[tuple[object, tuple[object, ...]]]) -> None:
        """Name everything the setup built, and each actor's task and operations.

        Call once, before any actor runs.  Runs once per replayed schedule, so it
        collects (object, name) pairs and files them in one go; the first name of
        an object reachable twice wins.
        """
        m = w.m
        pairs = [(w, "world"), (m, "m")]
        put = pairs.append
        for attr in ("mem", "dmap", "tlb", "locks", "alloc", "trace", "inv", "faults", "design",
                     "profile", "config", "mappings", "kvms"):
            put((getattr(m, attr), attr))
        mem = m.mem
        for col in type(mem).__slots__:
            put((getattr(mem, col), "mem." + col))
        for i, (task, ops) in enumerate(actors):
            put((task, f"task{i}"))
            put((ops, f"ops{i}"))
            for j, op in enumerate(ops):
                put((op, f"op{i}.{j}"))
        for kid, kvm in sorted(m.kvms.items()):
            self._kvm(put, kvm, f"kvm{kid}")
        for mid, mapping in sorted(m.mappings.items()):
            self._mapping(put, mapping, f"as{mid}")
        for proc in (w.proc, *(kvm.owner for kvm in m.kvms.values())):
            if all(p is not proc for p in self.procs):
                self._proc(put, proc)
        names = self.names
        for obj, name in reversed(pairs):
            names[id(obj)] = name
        self._keep = pairs
        self.inodes = list({id(i): i for i in self.inodes}.values())  # once each, in order

    @staticmethod
    def _xa(put: Callable[[tuple[object, str]], None], xa: XArray, name: str) -> None:
        # Generators over an xarray hold its node dicts; its content is digested with the
        # machine, so a name is all an actor's digest needs.
        put((xa, name))
        for slot in XArray.__slots__:
            value = getattr(xa, slot)
            if isinstance(value, dict):
                put((value, f"{name}.{slot}"))

    def _kvm(self, put: Callable[[tuple[object, str]], None], kvm: Kvm, name: str) -> None:
        put((kvm, name))
        self._xa(put, kvm.spte, name + ".spte")
        put((kvm.memslots, name + ".memslots"))
        for sid, slot in sorted(kvm.memslots.items()):
            put((slot, f"{name}.slot{sid}"))
        for vid, vcpu in sorted(kvm.vcpus.items()):
            put((vcpu, f"{name}.vcpu{vid}"))
            put((vcpu.task, f"{name}.vcpu{vid}.task"))

    def _mapping(self, put: Callable[[tuple[object, str]], None], mapping: AddressSpace,
                 name: str) -> None:
        put((mapping, name))
        self._xa(put, mapping.i_pages, name + ".i_pages")
        put((mapping.i_mmap, name + ".i_mmap"))
        put((mapping.private_list, name + ".private_list"))
        if mapping.host is not None:
            self.inodes.append(mapping.host)
            put((mapping.host, name + ".inode"))
        if mapping.a_ops is not None:
            put((mapping.a_ops, type(mapping.a_ops).__qualname__))
        for i, f in enumerate(mapping.private_list):
            self._gmem_file(put, f, f"{name}.gf{i}")

    @staticmethod
    def _gmem_file(put: Callable[[tuple[object, str]], None], f: GmemFile, name: str) -> None:
        put((f, name))
        put((f.bindings, name + ".bindings"))
        for j, b in enumerate(f.bindings):
            put((b, f"{name}.b{j}"))

    def _proc(self, put: Callable[[tuple[object, str]], None], proc: Process) -> None:
        self.procs.append(proc)
        name = f"proc{proc.pid}"
        put((proc, name))
        put((proc.mm, name + ".mm"))
        put((proc.mm.vmas, name + ".vmas"))
        put((proc.mm.notifiers, name + ".notifiers"))
        put((proc.fds, name + ".fds"))
        put((proc.fds.files, name + ".fds.files"))
        for fd, file in sorted(proc.fds.files.items()):
            self.files.append(file)
            self.inodes.append(file.inode)
            put((file, f"{name}.file{fd}"))
            put((file.f_op, f"{name}.file{fd}.f_op"))
            put((file.inode, f"{name}.file{fd}.inode"))
            if isinstance(file.private_data, GmemFile):
                self._gmem_file(put, file.private_data, f"{name}.file{fd}.gf")
        for vma in proc.mm.vmas:
            vname = f"{name}.vma{vma.start:#x}"
            put((vma, vname))
            self._xa(put, vma.ptes, vname + ".ptes")

    # --- canonical values -----------------------------------------------------------------------
    def canon(self, v: object) -> Any:
        t = type(v)
        if t in _ATOMS:
            return v
        if v is None:
            return NONE
        name = self.names.get(id(v))
        if name is not None:
            return name
        handler = _HANDLERS.get(t)
        if handler is not None:
            return handler(self, v)
        if isinstance(v, _ITERATOR_TYPES):
            return ("iter", t.__name__, self.canon(v.__reduce__()[1:]))
        if isinstance(v, BaseException):
            return ("exc", t.__qualname__)
        if is_dataclass(v):  # a small value object created after setup: by content
            return (t.__qualname__, *(self.canon(getattr(v, f.name)) for f in fields(v)))
        self.unknown.add(t.__qualname__)
        return ("?", t.__qualname__, id(v))

    def generator(self, gen: Generator[Any, Any, Any]) -> tuple[Any, ...]:
        """A suspended generator: code position, bound locals, locals and stack values."""
        g = cast("GeneratorType[Any, Any, Any]", gen)
        frame = g.gi_frame
        if frame is None:
            return ("done", _code_id(g.gi_code))
        code = g.gi_code
        refs = gc.get_referents(g)
        i = 3  # gi_code, gi_name, gi_qualname; then frame object, locals dict, function
        while refs[i] is not code:
            i += 1
        canon = self.canon
        return (_code_id(code), frame.f_lasti, tuple(frame.f_locals),
                tuple([canon(x) for x in refs[i + 1:]]))

    def machine(self, m: Machine) -> tuple[Any, ...]:
        """The machine state, as a hashable key."""
        bufs: list[Any] = []  # hashed in one call: a few dozen small updates cost more
        small = [self._fields(m.mem, bufs, MEM_NOT_STATE), self._fields(m.dmap, bufs),
                 self._fields(m.alloc, bufs)]
        name = self.canon
        kvms = tuple(
            (kid, kvm.users, kvm.destroyed, kvm.mmu_invalidate_seq, kvm.mmu_invalidate_in_progress,
             kvm.mmu_invalidate_range, _xa(kvm.spte), tuple(sorted(kvm.attributes.items())),
             tuple((sid, s.base_gfn, s.npages, s.flags, name(s.gmem_file), s.gmem_pgoff, s.gmem_only)
                   for sid, s in sorted(kvm.memslots.items())),
             tuple(sorted(kvm.vcpus)))
            for kid, kvm in sorted(m.kvms.items()))
        mappings = tuple(
            (mid, a.flags, _xa(a.i_pages), tuple(name(v) for v in a.i_mmap),
             tuple((name(f), f.kvm.id, tuple((b.start, b.end, name(b.slot)) for b in f.bindings))
                   for f in a.private_list))
            for mid, a in sorted(m.mappings.items()))
        objects = (
            tuple((f.f_count, f.released, f.pos) for f in self.files),
            tuple((i.i_count, i.evicted, i.size, i.private) for i in self.inodes),
            tuple((tuple((fd, name(f)) for fd, f in sorted(p.fds.files.items())),
                   tuple((name(v), v.start, v.end, v.pgoff, v.flags, name(v.file), _xa(v.ptes))
                         for v in p.mm.vmas),
                   tuple(name(k) for k in p.mm.notifiers))
                  for p in self.procs),
        )
        other = tuple((k, name(v)) for k, v in sorted(vars(m).items())
                      if k not in MACHINE_NOT_STATE and k not in _MACHINE_SPECIAL)
        columns = hashlib.blake2b(b"".join(bufs), digest_size=16).digest()
        return (columns, tuple(small), kvms, mappings, objects, m.tlb.state(), m.locks.state(),
                self._faults(m), self._instance(m.design), other)

    def _fields(self, obj: object, bufs: list[Any], skip: frozenset[str] = frozenset()
                ) -> tuple[Any, ...]:
        """Every slot of ``obj`` but ``skip``: buffers (and dicts of them) onto ``bufs``, the
        rest canonicalised."""
        key = (type(obj), skip)
        slots = _SLOTS.get(key)
        if slots is None:
            slots = _SLOTS[key] = tuple(s for s in getattr(type(obj), "__slots__", ()) if s not in skip)
        rest = []
        for slot in slots:
            value = getattr(obj, slot)
            vt = type(value)
            if vt in _BUFFERS:
                bufs.append(value)
            elif vt is dict and value and type(next(iter(value.values()))) in _BUFFERS:
                for k in sorted(value):
                    bufs.append(repr(k).encode())
                    bufs.append(value[k])
            else:
                rest.append(self.canon(value))
        return tuple(rest)

    def _faults(self, m: Machine) -> tuple[Any, ...]:
        """Armed fault-injection sites (what is left of them) and the generator, if drawn from."""
        arms = getattr(m.faults, "_arms", {})
        state = tuple(sorted((site, self.canon(arm)) for site, arm in arms.items()))
        if any(getattr(arm, "probability", 1.0) < 1.0 for arm in arms.values()):
            return state, m.faults.rng.getstate()
        return state

    def _instance(self, obj: object) -> tuple[Any, ...]:
        """An object's own attributes (a design keeps pools and queues there)."""
        attrs = getattr(obj, "__dict__", {})
        return tuple((k, self.canon(v)) for k, v in sorted(attrs.items()))


def _seq(n: Namer, v: Any) -> tuple[Any, ...]:
    return tuple([n.canon(x) for x in v])


def _dict(n: Namer, v: dict[Any, Any]) -> tuple[Any, ...]:
    return ("dict", tuple(sorted(((n.canon(k), n.canon(x)) for k, x in v.items()), key=repr)))


def _set(n: Namer, v: set[Any] | frozenset[Any]) -> tuple[Any, ...]:
    return ("set", tuple(sorted((n.canon(x) for x in v), key=repr)))


def _method(n: Namer, v: MethodType) -> tuple[Any, ...]:
    return ("method", v.__func__.__qualname__, n.canon(v.__self__))


def _cell(n: Namer, v: CellType) -> tuple[Any, ...]:
    try:
        return ("cell", n.canon(v.cell_contents))
    except ValueError:  # an empty cell: the closure variable is not bound yet
        return ("cell",)


def _function(n: Namer, v: FunctionType) -> str:
    return f"{v.__module__}.{v.__qualname__}"


def _builtin(n: Namer, v: BuiltinMethodType) -> tuple[Any, ...]:
    return ("builtin", v.__qualname__, n.canon(v.__self__))


def _buffer(n: Namer, v: bytearray | memoryview) -> tuple[str, bytes]:
    return ("buf", bytes(v))


def _array(n: Namer, v: Any) -> tuple[str, str, bytes]:
    return ("array", v.typecode, v.tobytes())


def _build_handlers() -> dict[type, Callable[[Namer, Any], Any]]:
    from array import array

    from gmemlab.check.world import Op
    from gmemlab.model.task import Task

    return {
        tuple: _seq,
        list: lambda n, v: ("list", *_seq(n, v)),
        dict: _dict,
        set: _set,
        frozenset: _set,
        GeneratorType: lambda n, v: ("gen", n.generator(v)),
        MethodType: _method,
        FunctionType: _function,
        BuiltinMethodType: _builtin,
        MethodDescriptorType: lambda n, v: ("descr", v.__qualname__),
        WrapperDescriptorType: lambda n, v: ("descr", v.__qualname__),
        range: lambda n, v: ("range", v.start, v.stop, v.step),
        # A method that calls super() keeps its class in a __class__ cell; classes do not change.
        type: lambda n, v: ("class", v.__module__, v.__qualname__),
        CellType: _cell,
        bytearray: _buffer,
        memoryview: _buffer,
        array: _array,
        # Small value objects an actor may create after setup: digested by content.
        Op: lambda n, v: ("op", v.label, _function(n, v.fn), v.args),
        Task: lambda n, v: ("task", v.name, v.cpu),
    }


_HANDLERS = _build_handlers()

