"""State fingerprints: a digest of the machine plus every actor's progress.

Two schedules that reach the same fingerprint reach the same state, so the
explorer expands it once (state hashing).  That is sound only if the digest
covers everything that can influence what happens next:

* the machine: every memmap column the kernel paths read (``gen`` is left
  out: it counts folio lifetimes for reports and steers nothing), the direct
  map tables, the TLBs, locks, allocator free list, fault-injection counters,
  page caches, user page tables, stage-2 tables, memslots and bindings, file,
  inode and VM reference counts.  Trace and statistics counters are left out.
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
"""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Callable, Generator, Iterable
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

# MemMap columns the kernel paths read; ``gen`` (a lifetime counter for reports) and the
# dense content/taint dicts (exposure data, never read by a decision) are left out.
MEM_COLUMNS = ("state", "kind", "flags", "private", "refcount", "mapcount", "s2count", "mapping",
               "index", "guest_owned", "invalidated", "fill", "taint_full")
_ATOMS = (int, str, bool, float, bytes, type(None))
# Iterators whose __reduce__ gives what is left to iterate (plus their wrappers).
_ITERABLES: tuple[Iterable[Any], ...] = ([], (), range(1), {}, {}.items(), {}.values(), set(), "", b"",
                                         bytearray())
_ITERATOR_TYPES: tuple[type, ...] = (*(type(iter(x)) for x in _ITERABLES),
                                     enumerate, zip, map, filter, reversed)
_code_ids: dict[CodeType, int] = {}


def _code_id(code: CodeType) -> int:
    cid = _code_ids.get(code)
    if cid is None:
        cid = _code_ids[code] = len(_code_ids)
    return cid


def _xa(xa: XArray) -> tuple[tuple[int, int], ...]:
    return tuple(xa.items())


class Namer:
    """Stable names for the objects of one execution, and the canonicaliser that uses them."""

    __slots__ = ("_keep", "files", "inodes", "names", "procs", "unknown")

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self._keep: list[object] = []  # keeps named objects alive, so their ids stay theirs
        self.unknown: set[str] = set()
        # Named objects whose own fields are state (digested by machine()).
        self.files: list[File] = []
        self.inodes: list[Inode] = []
        self.procs: list[Process] = []

    def add(self, obj: object, name: str) -> None:
        if id(obj) in self.names:
            return
        self.names[id(obj)] = name
        self._keep.append(obj)
        if isinstance(obj, XArray):
            # Generators over an xarray hold its node dict; the xarray's content is in the
            # machine digest, so a name is all the actor's digest needs.
            for slot in XArray.__slots__:
                value = getattr(obj, slot)
                if isinstance(value, dict):
                    self.add(value, f"{name}.{slot}")

    def name_world(self, w: World, actors: Iterable[tuple[object, tuple[object, ...]]]) -> None:
        """Name everything the setup built, and each actor's task and operations.

        Call once, before any actor runs.
        """
        m = w.m
        add = self.add
        add(w, "world")
        add(m, "m")
        for attr in ("mem", "dmap", "tlb", "locks", "alloc", "trace", "inv", "faults", "design",
                     "profile", "config", "mappings", "kvms"):
            add(getattr(m, attr), attr)
        for col in MEM_COLUMNS:
            add(getattr(m.mem, col), "mem." + col)
        for i, (task, ops) in enumerate(actors):
            add(task, f"task{i}")
            add(ops, f"ops{i}")
            for j, op in enumerate(ops):
                add(op, f"op{i}.{j}")
        for kid, kvm in sorted(m.kvms.items()):
            self._name_kvm(kvm, f"kvm{kid}")
        for mid, mapping in sorted(m.mappings.items()):
            self._name_mapping(mapping, f"as{mid}")
        self._name_proc(w.proc)
        for kvm in m.kvms.values():
            self._name_proc(kvm.owner)

    @staticmethod
    def _track(objects: list[Any], obj: Any) -> bool:
        """Append ``obj`` (by identity) unless it is there; whether it was new."""
        if any(o is obj for o in objects):
            return False
        objects.append(obj)
        return True

    def _name_kvm(self, kvm: Kvm, name: str) -> None:
        self.add(kvm, name)
        self.add(kvm.spte, name + ".spte")
        self.add(kvm.memslots, name + ".memslots")
        for sid, slot in sorted(kvm.memslots.items()):
            self.add(slot, f"{name}.slot{sid}")
        for vid, vcpu in sorted(kvm.vcpus.items()):
            self.add(vcpu, f"{name}.vcpu{vid}")
            self.add(vcpu.task, f"{name}.vcpu{vid}.task")

    def _name_mapping(self, mapping: AddressSpace, name: str) -> None:
        self.add(mapping, name)
        self.add(mapping.i_pages, name + ".i_pages")
        self.add(mapping.i_mmap, name + ".i_mmap")
        self.add(mapping.private_list, name + ".private_list")
        if mapping.host is not None:
            self._track(self.inodes, mapping.host)
            self.add(mapping.host, name + ".inode")
        if mapping.a_ops is not None:
            self.add(mapping.a_ops, type(mapping.a_ops).__qualname__)
        for i, f in enumerate(mapping.private_list):
            self._name_gmem_file(f, f"{name}.gf{i}")

    def _name_gmem_file(self, f: GmemFile, name: str) -> None:
        self.add(f, name)
        self.add(f.bindings, name + ".bindings")
        for j, b in enumerate(f.bindings):
            self.add(b, f"{name}.b{j}")

    def _name_proc(self, proc: Process) -> None:
        if not self._track(self.procs, proc):
            return
        name = f"proc{proc.pid}"
        self.add(proc, name)
        self.add(proc.mm, name + ".mm")
        self.add(proc.mm.vmas, name + ".vmas")
        self.add(proc.mm.notifiers, name + ".notifiers")
        self.add(proc.fds, name + ".fds")
        self.add(proc.fds.files, name + ".fds.files")
        for fd, file in sorted(proc.fds.files.items()):
            self._track(self.files, file)
            self._track(self.inodes, file.inode)
            self.add(file, f"{name}.file{fd}")
            self.add(file.f_op, f"{name}.file{fd}.f_op")
            self.add(file.inode, f"{name}.file{fd}.inode")
            if isinstance(file.private_data, GmemFile):
                self._name_gmem_file(file.private_data, f"{name}.file{fd}.gf")
        for vma in proc.mm.vmas:
            vname = f"{name}.vma{vma.start:#x}"
            self.add(vma, vname)
            self.add(vma.ptes, vname + ".ptes")

    # --- canonical values -----------------------------------------------------------------------
    def canon(self, v: object) -> Any:
        t = type(v)
        if t in _ATOMS:
            return v
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
        h = hashlib.blake2b(digest_size=16)
        mem = m.mem
        for col in MEM_COLUMNS:
            h.update(getattr(mem, col))
        d = m.dmap
        h.update(d.pud)
        h.update(d.pmd)
        for r2 in sorted(d.pte):
            h.update(r2.to_bytes(8, "little"))
            h.update(d.pte[r2])
        h.update(m.alloc.freelist)
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
        return (h.digest(), kvms, mappings, objects, m.tlb.state(), m.locks.state(),
                tuple(sorted(m.faults.fired.items())))


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


def _dataclass_fields(n: Namer, v: Any) -> tuple[Any, ...]:
    return (type(v).__qualname__, *(n.canon(getattr(v, f)) for f in v.__slots__))


def _build_handlers() -> dict[type, Callable[[Namer, Any], Any]]:
    from array import array

    from gmemlab.check.world import Op
    from gmemlab.model.kvm.guest_memfd import Binding
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
        CellType: _cell,
        bytearray: _buffer,
        memoryview: _buffer,
        array: _array,
        # Small value objects an actor may create after setup: digested by content.
        Op: lambda n, v: ("op", v.label, _function(n, v.fn), v.args),
        Task: lambda n, v: ("task", v.name, v.cpu),
        Binding: _dataclass_fields,
    }


_HANDLERS = _build_handlers()

