"""guest_memfd with 2 MiB folios: v12's refusal, and folio2m's whole-folio zap (issue 11 item 5).

The allocation follows the THP guest_memfd patch (``kvm_gmem_get_huge_folio()``,
20231027182217.3615211-18-seanjc@google.com); v12 02/16 refuses large folios in
``folio_zap_direct_map()`` and mainline's user fault WARNs and SIGBUSes on one.
"""

from __future__ import annotations

import errno

import pytest

from gmemlab.api import KernelError, SigBus, run_program
from gmemlab.guest import GuestProgram
from gmemlab.model.mm.direct_map import LEVEL_2M
from gmemlab.model.mm.folio import folio_test_large
from gmemlab.uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_MEM_GUEST_MEMFD,
)
from tests.conftest import model_host

PAGE = 4096
HUGE = 2 << 20
ALL = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED | GUEST_MEMFD_FLAG_NO_DIRECT_MAP
GPA = 1 << 32
PUNCH = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


def events(h: object, name: str) -> int:
    return sum(1 for e in h.machine.trace.events() if e.event == name)  # type: ignore[attr-defined]


def test_v12_user_fault_on_a_large_folio_warns_and_sigbuses() -> None:
    h = model_host("v12", "x86_64-gmem-thp", ram_gib=1)
    g = h.open_kvm().create_vm().create_guest_memfd(HUGE, ALL)
    with g.mmap(HUGE) as mem:
        with pytest.raises(SigBus):
            mem.fill(PAGE, PAGE, 1)
        pfn = g.pfn(PAGE)
        assert folio_test_large(h.machine, pfn)
        assert events(h, "warn_on_once") == 1
        assert h.machine.dmap.present(pfn)  # nothing was zapped


def test_v12_guest_fault_on_a_large_folio_fails_kvm_run_with_einval() -> None:
    """kvm_gmem_get_pfn() -> kvm_gmem_folio_zap_direct_map() -> -EINVAL, no zap, no flush:
    KVM_RUN returns it with a KVM_EXIT_MEMORY_FAULT."""
    h = model_host("v12", "x86_64-gmem-thp", ram_gib=1)
    vm = h.open_kvm().create_vm()
    g = vm.create_guest_memfd(HUGE, ALL)
    vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GPA, HUGE, g.mmap(HUGE).addr, g, 0)
    with vm.create_vcpu(0) as vcpu, pytest.raises(KernelError) as e:
        run_program(vcpu, GuestProgram().fill(GPA, PAGE, 1))
    assert e.value.errno == errno.EINVAL
    assert events(h, "refuse_large") == 1
    assert h.machine.trace.counts["flush_tlb_kernel_range"] == 0
    assert h.machine.dmap.present(g.pfn(0))


def test_mainline_maps_large_folios_and_falls_back_to_order_0() -> None:
    """base on the THP profile: a 2 MiB folio where the whole huge page fits inside i_size and
    none of it is cached; order 0 for the tail of a file that is not a multiple of 2 MiB."""
    h = model_host("base", "x86_64-gmem-thp", ram_gib=1)
    vm = h.open_kvm().create_vm()
    flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
    g = vm.create_guest_memfd(HUGE + PAGE, flags)
    vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GPA, HUGE + PAGE, g.mmap(HUGE + PAGE).addr, g, 0)
    with vm.create_vcpu(0) as vcpu:
        assert run_program(vcpu, GuestProgram().fill(GPA + PAGE, PAGE, 1).fill(GPA + HUGE, PAGE, 2)).ok
    m = h.machine
    head = g.pfn(0)
    assert head % 512 == 0 and g.pfn(511 * PAGE) == head + 511
    assert all(folio_test_large(m, head + k) for k in range(512))
    assert not folio_test_large(m, g.pfn(HUGE))


def test_folio2m_zaps_and_flushes_a_whole_folio_once_without_splitting_it() -> None:
    h = model_host("folio2m", ram_gib=2)
    m = h.machine
    g = h.open_kvm().create_vm().create_guest_memfd(2 * HUGE, ALL)
    with g.mmap(2 * HUGE) as mem:
        mem.fill(0, 2 * HUGE, 7)
        head = g.pfn(0)
        assert m.dmap.leaf(head) == (LEVEL_2M, head, False)
        assert m.dmap.splits_2m == 0
        assert events(h, "dmap_clear_2m") == 2
        # one flush per folio, and the one of the 1 GiB split
        assert m.trace.counts["flush_tlb_kernel_range"] == 2
        assert all(not m.dmap.present(g.pfn(off)) for off in range(0, 2 * HUGE, 64 * PAGE))
        assert not h.gadget_read(1, g.pfn(5 * PAGE))


def test_folio2m_frees_a_folio_whole_and_restores_its_leaf() -> None:
    """A punch inside a folio frees nothing (its frame is held, still zapped); once the whole
    folio is gone, one CPA call makes the 2 MiB leaf present again and 512 frames are free."""
    h = model_host("folio2m", ram_gib=2)
    m = h.machine
    g = h.open_kvm().create_vm().create_guest_memfd(HUGE, ALL)
    with g.mmap(HUGE) as mem:
        mem.write(0, b"secret")
        head = g.pfn(0)
        free = m.alloc.nr_free
        g.fallocate(PUNCH, 0, PAGE)
        assert m.alloc.nr_free == free and not m.dmap.present(head)
        assert m.design.holds_unmapped(m, head)
        m.inv.check_all()
    g.fallocate(PUNCH, 0, HUGE)
    assert m.alloc.nr_free == free + 512
    assert m.dmap.leaf(head) == (LEVEL_2M, head, True)
    assert m.dmap.splits_2m == 0 and events(h, "dmap_set_2m") == 1
    assert not m.inv.violations
    m.inv.check_all()


def test_folio2m_zap_enomem_at_the_1g_split_is_retried_whole_at_the_next_fault() -> None:
    h = model_host("folio2m", ram_gib=2)
    m = h.machine
    g = h.open_kvm().create_vm().create_guest_memfd(HUGE, ALL)
    with g.mmap(HUGE) as mem:
        m.faults.arm("pt_alloc", times=-1)
        with pytest.raises(KernelError) as e:
            mem.fill(0, PAGE, 1)
        assert e.value.errno == errno.ENOMEM
        m.faults.disarm("pt_alloc")
        mem.fill(PAGE, PAGE, 1)
        head = g.pfn(0)
        assert m.dmap.leaf(head) == (LEVEL_2M, head, False) and m.dmap.splits_2m == 0
    assert not m.inv.violations


def test_folio2m_on_arm64_bbml2_splits_only_the_pud() -> None:
    """arm64 with BBML2_NOABORT: update_range_prot() splits the PUD block around the folio and
    flips the PMD block whole; set_memory_valid() flushes, then the caller does (double)."""
    h = model_host("folio2m", "arm64-bbml2", ram_gib=2, low_ram_mib=2)
    m = h.machine
    g = h.open_kvm().create_vm().create_guest_memfd(HUGE, ALL)
    with g.mmap(HUGE) as mem:
        mem.fill(0, HUGE, 3)
    head = g.pfn(0)
    assert m.dmap.leaf(head) == (LEVEL_2M, head, False)
    assert (m.dmap.splits_1g, m.dmap.splits_2m) == (1, 0)
    assert m.trace.counts["flush_tlb_kernel_range"] == 2 and m.trace.counts["flush_tlb_all"] == 0
