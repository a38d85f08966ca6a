"""The twin's private guest environment: page tables, areas, long-mode state (no KVM needed)."""

from __future__ import annotations

import array

import pytest

from gmemlab import uapi
from gmemlab.twin import guestenv as env

PAGE = uapi.PAGE_SIZE


def _entries(tables: bytes, page: int) -> array.array[int]:
    return array.array("Q", tables[page * PAGE : (page + 1) * PAGE])


def test_page_tables_with_1g_pages() -> None:
    tables = env.page_tables(True)
    assert len(tables) == 2 * PAGE
    pml4, pdpt = _entries(tables, 0), _entries(tables, 1)
    assert pml4[0] == env.PRIVATE_GPA + env.PDPT_OFFSET | 0x7
    assert not any(pml4[1:])
    assert [pdpt[i] for i in (0, 4, 511)] == [0x87, (4 << 30) | 0x87, (511 << 30) | 0x87]


def test_page_tables_with_2m_pages() -> None:
    tables = env.page_tables(False)
    assert len(tables) == (2 + 512) * PAGE
    assert env.PD_OFFSET + 512 * PAGE <= env.AREAS_OFFSET
    pdpt = _entries(tables, 1)
    assert pdpt[4] == env.PRIVATE_GPA + env.PD_OFFSET + 4 * PAGE | 0x7
    pd4 = _entries(tables, 2 + 4)  # the directory of GiB 4, where the selftest binds gmem
    assert pd4[0] == (4 << 30) | 0x87
    assert pd4[1] == (4 << 30) + (2 << 20) | 0x87
    assert _entries(tables, 2 + 511)[511] == env.IDENTITY_LIMIT - (2 << 20) | 0x87


def test_areas_and_reserved_range() -> None:
    first, last = env.area(0x1000_0000, 0), env.area(0x1000_0000, env.MAX_PROGRAM_VCPUS - 1)
    assert first.code_gpa == env.PRIVATE_GPA + env.AREAS_OFFSET
    assert last.stack_top_gpa == env.PRIVATE_GPA + env.PRIVATE_SIZE
    assert first.code_hva - 0x1000_0000 == env.AREAS_OFFSET
    with pytest.raises(ValueError):
        env.area(0, env.MAX_PROGRAM_VCPUS)
    assert env.RESERVED_END <= env.IDENTITY_LIMIT


def test_long_mode_sregs() -> None:
    sregs = uapi.kvm_sregs()
    env.long_mode_sregs(sregs)
    assert (sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer) == (
        0x80050033,
        env.PRIVATE_GPA,
        0x20,
        0x500,
    )
    assert (sregs.cs.selector, sregs.cs.type, sregs.cs.dpl, sregs.cs.l, sregs.cs.db) == (0x33, 0xB, 3, 1, 0)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        assert (seg.selector, seg.type, seg.dpl, seg.db, seg.g, seg.present) == (0x2B, 3, 3, 1, 1, 1)
