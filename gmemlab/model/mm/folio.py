"""Folio operations: references, the folio lock, flags.

``include/linux/mm.h`` (``folio_get``/``folio_put``), ``mm/filemap.c``
(``folio_lock``/``folio_unlock``), ``include/linux/page-flags.h``.  A folio is
named by its PFN (order 0); the pages of a large folio (``PG_large``) are named
each by their own, and :func:`folio_pages` finds the folio's.  Each
operation is one step; ``folio_put`` that drops the last reference frees the
frame to the allocator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gmemlab.model.mm.memmap import PG_large, PG_locked, PG_uptodate
from gmemlab.model.mm.page_alloc import free_page_to_allocator
from gmemlab.model.task import WAIT, KGen
from gmemlab.uapi import PAGES_PER_PMD

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine


def folio_test_large(m: Machine, pfn: int) -> bool:
    """``folio_test_large(page_folio(page))``."""
    return bool(m.mem.flags[pfn] & PG_large)


def folio_pages(m: Machine, pfn: int) -> range:
    """The pages of ``pfn``'s folio (``folio_page(folio, 0 .. folio_nr_pages(folio) - 1)``)."""
    if m.mem.flags[pfn] & PG_large:
        head = pfn & ~(PAGES_PER_PMD - 1)
        return range(head, head + PAGES_PER_PMD)
    return range(pfn, pfn + 1)


def folio_get(m: Machine, pfn: int) -> KGen[None]:
    yield ("ref", pfn)
    m.mem.refcount[pfn] += 1


def folio_put(m: Machine, pfn: int, refs: int = 1) -> KGen[None]:
    """``folio_put()`` / ``folio_put_refs()``: the last put frees the frame."""
    yield ("ref", pfn)
    mem = m.mem
    r = mem.refcount[pfn] - refs
    mem.refcount[pfn] = r
    if r <= 0:
        if r < 0 and m.inv.enabled:
            m.inv.on_refcount(pfn, r)
        yield from free_page_to_allocator(m, pfn)


def folio_lock(m: Machine, pfn: int) -> KGen[None]:
    flags = m.mem.flags
    while True:
        yield ("folio", pfn)
        if not flags[pfn] & PG_locked:
            flags[pfn] |= PG_locked
            return
        yield (WAIT, ("folio", pfn))


def folio_trylock(m: Machine, pfn: int) -> KGen[bool]:
    yield ("folio", pfn)
    flags = m.mem.flags
    if flags[pfn] & PG_locked:
        return False
    flags[pfn] |= PG_locked
    return True


def folio_unlock(m: Machine, pfn: int) -> KGen[None]:
    yield ("folio", pfn)
    m.mem.flags[pfn] &= ~PG_locked
    if m.inv.enabled:
        m.inv.on_folio_unlock(pfn)


def folio_mark_uptodate(m: Machine, pfn: int) -> KGen[None]:
    yield ("folio", pfn)
    m.mem.flags[pfn] |= PG_uptodate
