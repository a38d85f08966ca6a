"""The model at sizes where per-page shortcuts would show: a few GiB, and files of a TiB.

* A 4 GiB NO_DIRECT_MAP guest touched sparsely (and densely in places),
  populated, punched and released: the batched paths leave what the per-page
  paths leave, every invariant holds (hooks and ``check_all``), and the memory
  accounts balance.
* Range operations cost per page that exists: punching a page out of a 1 TiB
  guest_memfd, or releasing one that holds three pages, visits a handful of
  xarray nodes, however large the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from gmemlab.api import run_program
from gmemlab.guest import GuestProgram
from gmemlab.model import Host, MachineConfig
from gmemlab.model.mm import xarray
from gmemlab.model.mm.memmap import FRAME_ALLOCATED, FRAME_FREE
from gmemlab.uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_MEM_GUEST_MEMFD,
    PAGE_SIZE,
)
from tests.scale.equivalence import first_difference, state

GIB = 1 << 30
MIB = 1 << 20
GPA = 1 << 32
NDM = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED | GUEST_MEMFD_FLAG_NO_DIRECT_MAP
PUNCH = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
SIZE = 4 * GIB


def sparse_lifecycle(h: Host) -> None:
    """Touch 4 GiB here and there, populate, punch, check, release."""
    vm = h.open_kvm().create_vm()
    gmem = vm.create_guest_memfd(SIZE, NDM)
    mapping = gmem.mmap(SIZE)
    vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GPA, SIZE, mapping.addr, gmem, 0)
    vcpu = vm.create_vcpu(0)
    rng = np.random.default_rng(6)
    prog = GuestProgram()
    for off in sorted(rng.choice(SIZE // PAGE_SIZE - 4, 600, replace=False).tolist()):
        prog.touch(GPA + off * PAGE_SIZE + 17, 3 * PAGE_SIZE, value=off & 0xFF)
    prog.fill(GPA + GIB + 5, 16 * MIB, 0xC3)
    run_program(vcpu, prog)
    mapping.fill(3 * GIB, 8 * MIB, 0x5A)
    mapping.write(3 * GIB + 8 * MIB + 100, b"vmm data")
    gmem.fallocate(PUNCH, GIB // 2, 2 * GIB)
    gmem.fallocate(FALLOC_FL_KEEP_SIZE, 3 * GIB + 4 * MIB, 8 * MIB)
    run_program(vcpu, GuestProgram().check(GPA + 3 * GIB, 4 * MIB, 0x5A)
                .touch(GPA + 3 * GIB + 4 * MIB, 8 * MIB))
    h.machine.inv.check_all()
    mapping.munmap()
    gmem.close()
    vcpu.close()
    vm.close()


def test_sparse_4gib_guest_batched_equals_per_page() -> None:
    states = []
    for batched in (False, True):
        h = Host(config=MachineConfig(ram_gib=5, trace="full", invariants="stop",
                                      range_paths=batched))
        sparse_lifecycle(h)
        m = h.machine
        m.inv.check_all()
        assert not m.inv.violations
        v = m.mem.views()
        # Every frame is free again but the direct map's page tables and the first MiB.
        allocated = int(np.count_nonzero(v.state == FRAME_ALLOCATED))
        reserved = int(np.count_nonzero(v.state[:0x100] == FRAME_ALLOCATED))
        tables = m.dmap.splits_1g + m.dmap.splits_2m
        assert m.alloc.nr_free == int(np.count_nonzero(v.state == FRAME_FREE))
        assert allocated == tables + reserved
        assert m.trace.counts["free_page"] == m.trace.counts["alloc_page"] - tables
        assert m.dmap.not_present_pages() == 0
        states.append(state(m))
    per_page, batched_state = states
    assert per_page == batched_state, first_difference(per_page, batched_state)


@contextmanager
def nodes_visited() -> Iterator[list[int]]:
    """Count the xarray nodes range walks look at."""
    seen = [0]
    keys = xarray.XArray._keys

    def counting(self: xarray.XArray, start: int, end: int | None) -> list[int] | range:
        out = keys(self, start, end)
        seen[0] += len(out)
        return out

    xarray.XArray._keys = counting  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        xarray.XArray._keys = keys  # type: ignore[method-assign]


@pytest.mark.parametrize("batched", [False, True], ids=["per-page", "batched"])
def test_range_operations_cost_what_exists_not_the_file_size(batched: bool) -> None:
    huge = 1 << 40  # 1 TiB of guest_memfd on a machine of 2 GiB
    h = Host(config=MachineConfig(ram_gib=0, low_ram_mib=512, trace="ring", invariants="stop",
                                  range_paths=batched))
    vm = h.open_kvm().create_vm()
    gmem = vm.create_guest_memfd(huge, NDM)
    mapping = gmem.mmap(huge)
    slot = 64 * GIB  # the guest sees the first 64 GiB of it
    vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GPA, slot, 0, gmem, 0)
    for off in (huge // 2, huge - PAGE_SIZE):
        mapping.write(off, b"x")
    third = slot // 3 // PAGE_SIZE * PAGE_SIZE
    run_program(vm.create_vcpu(0), GuestProgram().touch(GPA, PAGE_SIZE).touch(GPA + third, PAGE_SIZE))
    m = h.machine
    with nodes_visited() as seen:
        gmem.fallocate(PUNCH, huge // 2, PAGE_SIZE)  # one page out of a TiB
    assert seen[0] <= 2  # its page-cache node
    assert gmem.pfn(huge // 2) == -1 and m.trace.counts["free_page"] == 1
    with nodes_visited() as seen:
        mapping.munmap()
        gmem.close()  # release, evict: the three pages left
    assert seen[0] <= 8  # the nodes of its two PTEs, two stage-2 entries and three folios
    assert m.trace.counts["free_page"] == 4 and m.trace.counts["spte_zap"] == 2
    m.inv.check_all()
    assert not m.inv.violations


def test_xarray_entries_are_pfns_of_up_to_8_tib() -> None:
    xa = xarray.XArray()
    top = (1 << 31) - 1  # the last pfn of 8 TiB
    xa.store_range(1 << 40, np.array([top, xarray.EMPTY, 7], np.int64))
    assert xa.load_range(1 << 40, 3).tolist() == [top, xarray.EMPTY, 7]
    assert xa.load_range(1 << 40, 3).dtype == np.int64  # callers shift pfns into addresses
    with pytest.raises(OverflowError):
        xa.store_range(0, np.array([top + 1], np.int64))
    with pytest.raises(OverflowError):
        xa.store(0, top + 1)
    assert len(xa) == 2 and list(xa.blocks(0, 64)) == []  # no node left behind
