"""Truncation (``mm/truncate.c``): taking folios out of a page cache, range by range.

``truncate_inode_pages_range()`` backs punch-hole and ``ftruncate()`` shrinking;
``truncate_inode_pages_final()`` is what ``evict()`` runs when the last
reference to an inode goes (``fs/inode.c``), the default ``->evict_inode``
every modelled filesystem uses.  The range loop hands its pages to
``m.ranges.truncate`` first (:mod:`gmemlab.model.ranges`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gmemlab.model.mm.filemap import AddressSpace, filemap_free_folio, page_cache_delete
from gmemlab.model.mm.folio import folio_get, folio_lock, folio_put, folio_unlock
from gmemlab.model.mm.memory import unmap_mapping_folio
from gmemlab.model.task import KGen

if TYPE_CHECKING:
    from gmemlab.model.fs import Inode
    from gmemlab.model.machine import Machine


def truncate_inode_folio(m: Machine, mapping: AddressSpace, pfn: int) -> KGen[None]:
    """``truncate_cleanup_folio()`` + ``filemap_remove_folio()`` for a locked folio."""
    if m.mem.mapcount[pfn]:
        yield from unmap_mapping_folio(m, mapping, pfn)
    yield from page_cache_delete(m, mapping, pfn)
    yield from filemap_free_folio(m, mapping, pfn)


def truncate_inode_pages_range(m: Machine, mapping: AddressSpace, start: int,
                               end: int | None) -> KGen[int]:
    """``truncate_inode_pages_range()`` over page indices [start, end) (None: to the end).

    Returns the number of folios removed.
    """
    batched = m.ranges.truncate(m, mapping, start, end)
    if batched is not None:
        return batched
    removed = 0
    for index, pfn in mapping.i_pages.items(start, end):
        removed += yield from truncate_folio(m, mapping, index, pfn)
    return removed


def truncate_folio(m: Machine, mapping: AddressSpace, index: int, pfn: int) -> KGen[int]:
    """One folio of :func:`truncate_inode_pages_range`: 1 if it removed it, 0 if someone else did."""
    mem = m.mem
    yield from folio_get(m, pfn)  # find_lock_entries()
    yield from folio_lock(m, pfn)
    if mem.mapping[pfn] != mapping.id or mem.index[pfn] != index:
        yield from folio_unlock(m, pfn)  # someone else removed it meanwhile
        yield from folio_put(m, pfn)
        return 0
    yield from truncate_inode_folio(m, mapping, pfn)
    yield from folio_unlock(m, pfn)
    yield from folio_put(m, pfn)
    return 1


def truncate_inode_pages_final(m: Machine, inode: Inode) -> KGen[None]:
    """``truncate_inode_pages_final()``: the whole page cache, as ``evict()`` drops the inode."""
    yield from truncate_inode_pages_range(m, inode.mapping, 0, None)
