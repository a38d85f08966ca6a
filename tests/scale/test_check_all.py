"""``Invariants.check_all()`` picks its suspects with numpy and still reports what a
frame-by-frame sweep reports, in the same order."""

from __future__ import annotations

from gmemlab.api import run_program
from gmemlab.guest import GuestProgram
from gmemlab.model import Host, MachineConfig
from gmemlab.model.invariants import Invariants
from gmemlab.model.mm.direct_map import E_LEAF, E_LEAF_NP, PTE_NOT_PRESENT
from gmemlab.model.mm.filemap import AS_NO_DIRECT_MAP
from gmemlab.model.mm.memmap import KIND_KERNEL, KIND_PGTABLE
from gmemlab.uapi import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_MEM_GUEST_MEMFD,
)

MIB = 1 << 20
GPA = 1 << 32
NDM = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED | GUEST_MEMFD_FLAG_NO_DIRECT_MAP


def frame_by_frame(inv: Invariants) -> None:
    """The sweep as it is defined: every not-present PTE, folio, PTE and stage-2 entry."""
    m = inv.m
    mem = m.mem
    not_present = [(r2 << 9) + i for r2, ptes in m.dmap.pte.items()
                   for i, e in enumerate(ptes) if e == PTE_NOT_PRESENT]
    for table, n in ((m.dmap.pmd, 512), (m.dmap.pud, 1 << 18)):
        not_present += [pfn for leaf, e in enumerate(table) if e == E_LEAF_NP
                        for pfn in range(leaf * n, (leaf + 1) * n)]
    for pfn in not_present:
        if m.design.holds_unmapped(m, pfn):
            continue
        if not mem.allocated(pfn):
            inv.fail("free-frame-in-direct-map",
                     f"free pfn {pfn:#x} is not present in the direct map", pfn)
            continue
        mapping = m.folio_mapping(pfn)
        if mapping is None or not (mapping.test(AS_NO_DIRECT_MAP) or mapping.kind == "secretmem"):
            inv.fail("zap-only-no-direct-map",
                     f"pfn {pfn:#x} is out of the direct map but not a folio of an "
                     "AS_NO_DIRECT_MAP mapping", pfn)
    for mapping in list(m.mappings.values()):
        for _index, pfn in mapping.i_pages.items():
            if not mem.test_locked(pfn):
                inv.on_folio_unlock(pfn)
    for proc in m.processes:
        for vma in proc.mm.vmas:
            for _page, pfn in vma.ptes.items():
                inv.on_handout(pfn, "user PTE")
    for kvm in m.kvms.values():
        for _gfn, pfn in kvm.spte.items():
            inv.on_handout(pfn, "stage-2 mapping")
    held = {pfn for mapping in m.mappings.values() for _index, pfn in mapping.i_pages.items()}
    held |= {pfn for proc in m.processes for vma in proc.mm.vmas for _p, pfn in vma.ptes.items()}
    for pfn in range(mem.nr_pages):
        if (mem.allocated(pfn) and pfn not in held and mem.kind[pfn] not in (KIND_KERNEL, KIND_PGTABLE)
                and not m.design.holds_unmapped(m, pfn)):
            inv.on_unowned(pfn)


def broken_machine() -> Host:
    """A guest with every kind of inconsistency check_all() looks for, a few times each."""
    h = Host(config=MachineConfig(ram_gib=1, low_ram_mib=64, trace="ring", invariants="record"))
    vm = h.open_kvm().create_vm()
    gmem = vm.create_guest_memfd(4 * MIB, NDM)
    mapping = gmem.mmap(4 * MIB)
    vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GPA, 4 * MIB, mapping.addr, gmem, 0)
    mapping.fill(0, MIB, 1)
    run_program(vm.create_vcpu(0), GuestProgram().touch(GPA + MIB, 2 * MIB))
    m = h.machine
    for page in (3, 300, 700):  # restored behind the marker's back
        m.dmap.set_pte(gmem.pfn(page << 12), True)
    split = [(r2 << 9) + i for r2 in sorted(m.dmap.pte) for i in range(512)]
    for pfn in [p for p in split if not m.mem.allocated(p)][10:13]:  # free, out of the direct map
        m.dmap.set_pte(pfn, False)
    m.tlb.fill(1, 1, gmem.pfn(400 << 12))  # a stale translation of a mapped folio
    m.mem.mapping[gmem.pfn(500 << 12)] = 0  # out of the direct map, in no page cache
    for page in (600, 601):  # off the page cache, never freed: leaked
        gmem.file.inode.mapping.i_pages.erase(page)
    return h


def test_check_all_reports_what_a_frame_by_frame_sweep_reports() -> None:
    h = broken_machine()
    inv = h.machine.inv
    inv.check_all()
    fast = [(v.invariant.name, v.message, v.pfn) for v in inv.violations]
    inv.violations.clear()
    frame_by_frame(inv)
    slow = [(v.invariant.name, v.message, v.pfn) for v in inv.violations]
    assert len(fast) >= 8
    assert {name for name, _, _ in fast} >= {
        "free-frame-in-direct-map", "zap-only-no-direct-map", "marker-matches-direct-map",
        "handout-zapped", "handout-flushed", "frame-has-owner"}
    assert fast == slow


def test_check_all_sweeps_not_present_large_leaves() -> None:
    """A 2M leaf whose present bit is clear hides its 512 frames from a 4K-only sweep."""
    h = Host(config=MachineConfig(ram_gib=0, low_ram_mib=64, trace="ring", invariants="record"))
    m = h.machine
    leaf = next(r2 for r2, e in enumerate(m.dmap.pmd)
                if e == E_LEAF and not any(m.mem.allocated(p) for p in range(r2 << 9, (r2 + 1) << 9)))
    m.dmap.pmd[leaf] = E_LEAF_NP
    m.inv.check_all()
    assert m.inv.counts["free-frame-in-direct-map"] == 512
    assert m.inv.violations[0].pfn == leaf << 9
