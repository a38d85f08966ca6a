"""The page cache: ``struct address_space``, insertion, lookup, removal, truncation.

Models ``mm/filemap.c`` and ``mm/truncate.c``.  What the series relies on:

* ``AS_UNEVICTABLE``/``AS_INACCESSIBLE`` (set together by
  ``mapping_set_inaccessible()``) and the new ``AS_NO_DIRECT_MAP`` (bit 12 in v12).
* ``__filemap_get_folio(FGP_LOCK|FGP_CREAT)`` returns a locked folio with a
  reference, re-checking ``folio->mapping`` after taking the lock.
* Removal: ``page_cache_delete()`` clears ``folio->mapping`` *before*
  ``filemap_free_folio()`` calls ``->free_folio``; that is why the series keeps a
  per-folio marker instead of reading the inode flags there (Hugh Dickins, v6).
* Truncation locks each folio, unmaps it from every user page table, deletes
  it, runs ``->free_folio``, drops the page cache's reference, unlocks, and drops
  its own reference; the last put frees the frame to the allocator.

Designs hook two points (``design.filemap_add_hook``, ``design.filemap_remove_hook``):
the page-cache-level design proposed after v12 zaps on insertion and restores on
removal there.  Where a new folio comes from is the design's too
(``design.filemap_alloc_folio``): the unmapped-allocator ideas hand out frames
that are already out of the direct map.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from errno import EEXIST, ENOENT, ENOMEM
from typing import TYPE_CHECKING, Any, Protocol

from gmemlab.model.mm.folio import folio_lock, folio_put, folio_unlock
from gmemlab.model.mm.memmap import KIND_FILE, PG_locked
from gmemlab.model.mm.xarray import EMPTY, XArray
from gmemlab.model.task import KGen

if TYPE_CHECKING:
    from gmemlab.model.fs import Inode
    from gmemlab.model.machine import Machine
    from gmemlab.model.mm.memory import Vma

# enum mapping_flags (include/linux/pagemap.h), v12 numbering
AS_UNEVICTABLE = 3
AS_INACCESSIBLE = 8
AS_NO_DIRECT_MAP = 12

FGP_LOCK = 1 << 0
FGP_CREAT = 1 << 1
FGP_ACCESSED = 1 << 2



class AddressSpaceOps(Protocol):
    """``struct address_space_operations``: the hooks the page cache calls."""

    def free_folio(self, m: Machine, pfn: int) -> KGen[None] | None: ...


@dataclass(eq=False, slots=True)
class AddressSpace:
    id: int
    host: Inode | None
    a_ops: Any  # AddressSpaceOps or None
    gfp_mask: int
    flags: int = 0
    i_pages: XArray = field(default_factory=XArray)
    i_mmap: list[Vma] = field(default_factory=list)
    private_list: list[Any] = field(default_factory=list)  # i_private_list: gmem_file objects
    kind: str = ""

    def test(self, bit: int) -> bool:
        return bool(self.flags >> bit & 1)

    def set(self, bit: int) -> None:
        self.flags |= 1 << bit

    @property
    def invalidate_lock(self) -> tuple[str, int]:
        return ("invalidate_lock", self.id)

    @property
    def nrpages(self) -> int:
        return len(self.i_pages)


def mapping_set_inaccessible(mapping: AddressSpace) -> None:
    """Sets ``AS_UNEVICTABLE`` too: inaccessible folios cannot be reclaimed or migrated."""
    mapping.set(AS_UNEVICTABLE)
    mapping.set(AS_INACCESSIBLE)


def mapping_set_no_direct_map(mapping: AddressSpace) -> None:
    mapping.set(AS_NO_DIRECT_MAP)


def mapping_no_direct_map(mapping: AddressSpace) -> bool:
    return mapping.test(AS_NO_DIRECT_MAP)


def filemap_add_folio(m: Machine, mapping: AddressSpace, pfn: int, index: int) -> KGen[int]:
    """``filemap_add_folio()`` -> ``__filemap_add_folio()``: 0, -EEXIST or -ENOMEM.

    The folio comes back locked on success (``__folio_set_locked()``).
    """
    mem = m.mem
    mem.flags[pfn] |= PG_locked
    hook = m.design.filemap_add_hook
    if hook is not None:
        r = yield from hook(m, mapping, pfn)
        if r:
            mem.flags[pfn] &= ~PG_locked
            return r
    yield ("xa", (mapping.id, index))
    if mapping.i_pages.load(index) != EMPTY:
        if hook is not None:
            yield from m.design.filemap_add_undo(m, mapping, pfn)
        mem.flags[pfn] &= ~PG_locked
        return -EEXIST
    mem.refcount[pfn] += 1  # the page cache's reference
    mem.mapping[pfn] = mapping.id
    mem.index[pfn] = index
    mem.kind[pfn] = KIND_FILE
    mapping.i_pages.store(index, pfn)
    m.trace.emit("__filemap_add_folio", "pagecache_add", pfn, {"index": index, "as": mapping.kind})
    return 0


def filemap_get_folio(m: Machine, mapping: AddressSpace, index: int, fgp: int) -> KGen[int]:
    """``__filemap_get_folio()``: a folio with a reference (locked with FGP_LOCK), or -errno."""
    mem = m.mem
    while True:
        yield ("xa", (mapping.id, index))
        pfn = mapping.i_pages.load(index)
        if pfn != EMPTY:
            mem.refcount[pfn] += 1  # folio_try_get() under RCU
            if not fgp & FGP_LOCK:
                return pfn
            yield from folio_lock(m, pfn)
            if mem.mapping[pfn] == mapping.id and mem.index[pfn] == index:
                return pfn
            # Truncated while we slept on the lock: drop it and look again.
            yield from folio_unlock(m, pfn)
            yield from folio_put(m, pfn)
            continue
        if not fgp & FGP_CREAT:
            return -ENOENT
        pfn = yield from m.design.filemap_alloc_folio(m, mapping, index)
        if pfn < 0:
            return -ENOMEM
        err = yield from filemap_add_folio(m, mapping, pfn, index)
        if err:
            yield from folio_put(m, pfn)
            if err == -EEXIST:
                continue
            return err
        return pfn


def page_cache_delete(m: Machine, mapping: AddressSpace, pfn: int) -> KGen[None]:
    """``page_cache_delete()``: out of the xarray; ``folio->mapping = NULL``."""
    yield ("xa", (mapping.id, m.mem.index[pfn]))
    index = m.mem.index[pfn]
    mapping.i_pages.erase(index)
    m.mem.mapping[pfn] = 0
    m.trace.emit("page_cache_delete", "pagecache_del", pfn, {"index": index, "as": mapping.kind})


def filemap_free_folio(m: Machine, mapping: AddressSpace, pfn: int) -> KGen[None]:
    """``filemap_free_folio()``: ``->free_folio(folio)``, then drop the page cache's reference.

    A design's removal hook (the page-cache-level proposal's restore, "in
    filemap_remove_folio()") runs first, right after the folio left the xarray.
    """
    hook = m.design.filemap_remove_hook
    if hook is not None:
        yield from hook(m, mapping, pfn)
    free_folio = getattr(mapping.a_ops, "free_folio", None)
    if free_folio is not None:
        yield from free_folio(m, pfn)
    yield from folio_put(m, pfn)
