"""The direct map (x86 CPA, arm64 linear map) and the per-CPU TLBs.

series-spec §3.7-3.10, realkernel.md §3 (splits visible in /proc/meminfo,
never merged back), modeling-notes.md (a TLB fill is atomic with its walk).
"""

from __future__ import annotations

import errno

import pytest

from gmemlab.model import Machine, MachineConfig
from gmemlab.model.mm.direct_map import LEVEL_1G, LEVEL_2M, LEVEL_4K
from gmemlab.model.mm.set_memory import set_direct_map_valid_noflush
from gmemlab.model.mm.tlb import flush_tlb_kernel_range, kernel_access, speculative_read
from gmemlab.model.task import KGen
from gmemlab.uapi import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
)
from tests.conftest import model_host

PAGE = 4096
ALL = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED | GUEST_MEMFD_FLAG_NO_DIRECT_MAP
G = 1 << 18  # pages per 1G


def run(m: Machine, gen: KGen[object], cpu: int = 0) -> object:
    return m.run(m.task("test", cpu), gen)


def test_x86_boot_layout_matches_split_mem_range() -> None:
    """e820 [4K,636K) [1M,2G) [4G,8G): 4K head pieces, 2M to the first 1G boundary, then 1G."""
    m = Machine(MachineConfig(ram_gib=4))
    mi = m.meminfo()
    assert mi.direct_map_4k == (158 + 256) * 4
    assert mi.direct_map_2m == 511 * 2048
    assert mi.direct_map_1g == 5 * 1024 * 1024
    assert m.dmap.leaf(0x100)[:2] == (LEVEL_4K, 0x100)  # type: ignore[index]
    assert m.dmap.leaf(0x200)[:2] == (LEVEL_2M, 0x200)  # type: ignore[index]
    assert m.dmap.leaf(G + 5)[:2] == (LEVEL_1G, G)  # type: ignore[index]
    assert m.dmap.leaf(3 * G) is None  # the PCI hole is not mapped


def test_zap_splits_1g_then_2m_and_nothing_merges_back() -> None:
    m = Machine(MachineConfig(ram_gib=4))
    before = m.meminfo()
    pfn = 4 * G + 7
    assert run(m, set_direct_map_valid_noflush(m, pfn, 1, False)) == 0
    after = m.meminfo()
    assert (m.dmap.splits_1g, m.dmap.splits_2m) == (1, 1)
    assert after.direct_map_1g == before.direct_map_1g - 1024 * 1024
    assert after.direct_map_2m == before.direct_map_2m + 1024 * 1024 - 2048
    assert after.direct_map_4k == before.direct_map_4k + 2048
    assert not m.dmap.present(pfn) and m.dmap.present(pfn + 1)
    assert m.trace.counts["flush_tlb_all"] == 2 and m.trace.counts["pt_alloc"] == 2
    assert run(m, set_direct_map_valid_noflush(m, pfn, 1, True)) == 0
    assert m.dmap.present(pfn)
    assert m.meminfo() == after  # restore flips the present bit, merges nothing
    assert run(m, set_direct_map_valid_noflush(m, pfn + 1, 1, False)) == 0
    assert (m.dmap.splits_1g, m.dmap.splits_2m) == (1, 1)  # a split is paid once per region


def test_enomem_at_the_second_split_leaves_the_first_in_place() -> None:
    m = Machine(MachineConfig(ram_gib=4))
    m.faults.arm("pt_alloc", after=1, times=1)
    pfn = 5 * G + 3
    assert run(m, set_direct_map_valid_noflush(m, pfn, 1, False)) == -12
    assert (m.dmap.splits_1g, m.dmap.splits_2m) == (1, 0)
    assert m.dmap.present(pfn)
    assert m.dmap.leaf(pfn)[0] == LEVEL_2M  # type: ignore[index]


def test_arm64_linear_map_is_page_granular_and_needs_no_split() -> None:
    """Before BBML2_NOABORT, rodata_full forces page mappings (force_pte_mapping())."""
    m = Machine(MachineConfig(ram_gib=1), profile="arm64")
    assert m.meminfo().direct_map_2m == 0 and m.meminfo().direct_map_1g == 0
    pfn = 4 * G + 9
    assert run(m, set_direct_map_valid_noflush(m, pfn, 1, False)) == 0
    assert not m.dmap.present(pfn)
    assert m.trace.counts["pt_alloc"] == 0
    assert m.trace.counts["flush_tlb_kernel_range"] == 1  # set_memory_valid() flushes itself
    assert m.trace.counts["ipi"] == 0  # TLBI broadcast


def test_arm64_restore_sets_pte_valid_without_a_tlbi() -> None:
    """``__change_memory_common()``: no flush when only PTE_VALID is set (a non-valid entry
    cannot be cached); the invalidate flushes."""
    m = Machine(MachineConfig(ram_gib=1), profile="arm64")
    pfn = 4 * G + 9
    run(m, set_direct_map_valid_noflush(m, pfn, 1, False))
    run(m, set_direct_map_valid_noflush(m, pfn, 1, True))
    assert m.dmap.present(pfn)
    assert m.trace.counts["flush_tlb_kernel_range"] == 1


def test_arm64_bbml2_keeps_blocks_and_splits_the_leaf_on_demand() -> None:
    """BBML2_NOABORT: force_pte_mapping() is false under rodata_full, so the linear map keeps
    its blocks; split_kernel_leaf_mapping() splits PUD then PMD (one table each), with no
    flush of its own, before update_range_prot() clears the PTE and set_memory_valid() flushes."""
    m = Machine(MachineConfig(ram_gib=4), profile="arm64-bbml2")
    assert m.profile.can_set_direct_map and not m.profile.force_pte_mapping
    before = m.meminfo()
    assert before.direct_map_1g == 5 * 1024 * 1024  # blocks, as map_mem() lays them
    pfn = 4 * G + 7
    assert run(m, set_direct_map_valid_noflush(m, pfn, 1, False)) == 0
    assert (m.dmap.splits_1g, m.dmap.splits_2m) == (1, 1)
    assert m.trace.counts["pt_alloc"] == 2
    assert m.trace.counts["flush_tlb_all"] == 0
    assert m.trace.counts["flush_tlb_kernel_range"] == 1
    assert not m.dmap.present(pfn) and m.dmap.present(pfn + 1)
    assert run(m, set_direct_map_valid_noflush(m, pfn, 1, True)) == 0
    assert m.dmap.present(pfn) and m.trace.counts["flush_tlb_kernel_range"] == 1


def test_arm64_bbml2_changes_a_whole_2m_block_without_splitting_it() -> None:
    """A range that covers a PMD block whole is a leaf boundary at both ends: pageattr_pmd_entry()
    flips the block's valid bit, nothing is split or allocated."""
    m = Machine(MachineConfig(ram_gib=4), profile="arm64-bbml2")
    base = 4 * G + 512 * 5
    run(m, set_direct_map_valid_noflush(m, base, 512, False))
    assert (m.dmap.splits_1g, m.dmap.splits_2m) == (1, 0)  # the 1G block, not the 2M one
    assert m.dmap.leaf(base) == (LEVEL_2M, base, False)
    assert m.trace.counts["pt_alloc"] == 1
    assert m.dmap.not_present_pages() == 512


def test_arm64_bbml2_split_enomem_is_returned_and_still_flushed() -> None:
    """update_range_prot() WARNs and returns the split's -ENOMEM; __change_memory_common()
    flushes whatever it returned; the page stays mapped."""
    m = Machine(MachineConfig(ram_gib=4), profile="arm64-bbml2")
    m.faults.arm("pt_alloc", after=1, times=1)
    pfn = 5 * G + 3
    assert run(m, set_direct_map_valid_noflush(m, pfn, 1, False)) == -12
    assert (m.dmap.splits_1g, m.dmap.splits_2m) == (1, 0)
    assert m.dmap.present(pfn)
    assert m.trace.counts["flush_tlb_kernel_range"] == 1


@pytest.mark.parametrize("profile", ["arm64", "arm64-bbml2"])
def test_v12_user_fault_on_arm64_split_enomem(profile: str) -> None:
    """v12's user fault returns vmf_error(-ENOMEM) when the zap's split fails (only where the
    linear map is block mapped); the folio stays mapped and unmarked, the next fault zaps."""
    h = model_host("v12", profile, ram_gib=1, low_ram_mib=2)  # folios from the block-mapped GiB
    m = h.machine
    g = h.open_kvm().create_vm().create_guest_memfd(2 << 20, ALL)
    with g.mmap(2 << 20) as mem:
        m.faults.arm("pt_alloc", times=-1)
        if profile == "arm64":
            mem.fill(0, PAGE, 1)  # page-granular at boot: nothing to split, nothing fails
            assert not m.dmap.present(g.pfn(0))
            return
        with pytest.raises(OSError) as e:
            mem.fill(0, PAGE, 1)
        assert e.value.errno == errno.ENOMEM  # VM_FAULT_OOM: pagefault_out_of_memory() retries
        m.faults.disarm("pt_alloc")
        assert "warn_on_once" in {ev.event for ev in m.trace.events()}
        mem.fill(0, PAGE, 1)
        assert not m.dmap.present(g.pfn(0))


def test_arm64_without_can_set_direct_map_is_a_silent_no_op() -> None:
    """series-spec §3.9/bug 18: returns 0 and changes nothing; KVM must gate on the hook."""
    m = Machine(MachineConfig(ram_gib=1), profile="arm64-rodata-off")
    pfn = 4 * G + 9
    assert run(m, set_direct_map_valid_noflush(m, pfn, 1, False)) == 0
    assert m.dmap.present(pfn)


def test_v12_zap_double_flushes_on_arm64() -> None:
    """v11+: the generic helper always flushes, on top of set_memory_valid()'s own flush."""
    h = model_host("v12", "arm64")
    g = h.open_kvm().create_vm().create_guest_memfd(PAGE, ALL)
    with g.mmap(PAGE) as mem:
        mem.fill(0, PAGE, 1)
    assert h.machine.trace.counts["flush_tlb_kernel_range"] == 2


def test_flush_ipis_and_ceiling() -> None:
    m = Machine(MachineConfig(ram_gib=1, ncpus=4))
    base = 4 * G
    for cpu in range(4):
        run(m, kernel_access(m, base + cpu, "t", write=False), cpu)
    assert all(m.tlb.covers(c, base) for c in range(4))  # one 1G entry each
    run(m, flush_tlb_kernel_range(m, base, base + 1, "t"), 2)
    assert m.trace.counts["ipi"] == 3
    assert not m.tlb.cached_anywhere(base + 3)  # INVLPG of an address drops the 1G entry
    for cpu in range(4):
        run(m, kernel_access(m, base + 1000 + cpu, "t", write=False), cpu)
    m.tlb.fill(0, LEVEL_4K, base + 5000)
    run(m, flush_tlb_kernel_range(m, base, base + 34, "t"))  # > 33 pages: full flush
    assert not any(m.tlb.entries)


@pytest.mark.parametrize(("design", "reached"), [("v12", False), ("noflush", True)])
def test_stale_tlb_window_without_the_flush(design: str, reached: bool) -> None:
    """The CPU that zeroed the folio caches its translation; only a flush removes it."""
    h = model_host(design, invariants="record")
    m = h.machine
    g = h.open_kvm().create_vm().create_guest_memfd(PAGE, ALL)
    with g.mmap(PAGE) as mem:
        mem.write(0, b"guest secret")
        pfn = g.pfn(0)
        assert not m.dmap.present(pfn)
        assert m.tlb.covers(0, pfn) is reached
        assert h.gadget_read(0, pfn) is reached
        assert h.gadget_read(1, pfn) is False  # cpu1 never cached it: the walk stops
    verdicts = m.inv.verdicts()
    assert bool(verdicts["handout-flushed"]) is reached
    assert bool(verdicts["gadget-blocked"]) is reached


def test_gadget_reaches_exactly_where_a_translation_exists() -> None:
    m = Machine(MachineConfig(ram_gib=1, invariants="off"))
    pfn = 4 * G + 77
    assert run(m, speculative_read(m, 1, pfn))  # present: the walk fills cpu1's TLB
    run(m, set_direct_map_valid_noflush(m, pfn, 1, False))  # split flushes, PTE cleared
    assert not m.tlb.cached_anywhere(pfn)
    assert not run(m, speculative_read(m, 1, pfn))
    assert run(m, speculative_read(m, 1, pfn + 1))  # neighbour still present
