"""The series' shape as posted after v12: ``filemap`` (slow path) and ``unmapped`` (ALLOC_UNMAPPED + mermap).

Each test holds a design to what its posting specifies (``docs/next-shape.md``):
an ``AS_NO_DIRECT_MAP`` folio of the fast path is out of the direct map from its
allocation to its free, is zeroed through the mermap and never through the
direct map, and goes back to the unmapped free list; the direct map changes a
pageblock at a time, with one flush; the slow path zeroes, zaps and flushes on
insertion and restores, then zeroes, on removal.
"""

from __future__ import annotations

import errno

import pytest

from gmemlab.api import KernelError, run_program
from gmemlab.check.explore import explore
from gmemlab.check.scenarios import STANDARD, get_scenario
from gmemlab.cli import main
from gmemlab.guest import GuestProgram
from gmemlab.model.designs.unmapped_alloc import AS_MERMAP_STALE, PAGEBLOCK_ORDER, UnmappedAlloc
from gmemlab.model.host import Host
from gmemlab.model.mm.mermap import MERMAP_CPU_SLOTS
from gmemlab.model.task import Step
from gmemlab.scenarios.lifecycle import LifecycleConfig, run_lifecycle
from gmemlab.uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_MEM_GUEST_MEMFD,
    PAGES_PER_PMD,
)
from tests.conftest import model_host

PAGE = 4096
ALL = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED | GUEST_MEMFD_FLAG_NO_DIRECT_MAP
GPA = 1 << 32
PUNCH = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


def guest_memfd(h: Host, pages: int, flags: int = ALL):  # type: ignore[no-untyped-def]
    vm = h.open_kvm().create_vm()
    g = vm.create_guest_memfd(pages * PAGE, flags)
    vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GPA, pages * PAGE, 0, g, 0)
    return vm, g


def unmapped(h: Host) -> UnmappedAlloc:
    design = h.machine.design
    assert isinstance(design, UnmappedAlloc)
    return design


def events(h: Host, pfn: int) -> list[tuple[str, str, object]]:
    return [(e.fn, e.event, e.detail) for e in h.machine.trace if e.pfn == pfn]


# --- the fast path: ALLOC_UNMAPPED + mermap ---------------------------------------------------------
def test_a_folio_is_out_of_the_direct_map_from_allocation_to_free() -> None:
    """After every kernel step: no page of an unmapped pageblock is in the direct map or in a
    CPU's direct-map TLB, and every page-cache folio of the mapping lies in such a block."""
    h = model_host("unmapped", trace="full")
    m = h.machine
    design = unmapped(h)
    vm, g = guest_memfd(h, 8)
    mapping = m.mappings[max(m.mappings)]
    seen: set[int] = set()

    def after(step: Step) -> None:
        for block in design.unmapped_blocks:
            for pfn in range(block << PAGEBLOCK_ORDER, (block + 1) << PAGEBLOCK_ORDER):
                assert not m.dmap.present(pfn) and not m.tlb.cached_anywhere(pfn), (step, pfn)
        for _index, pfn in mapping.i_pages.items():
            assert pfn >> PAGEBLOCK_ORDER in design.unmapped_blocks, (step, pfn)
            seen.add(pfn)

    m.step_hook = after
    with g.mmap(8 * PAGE) as mem:
        mem.fill(0, 4 * PAGE, 0x5A)
        assert run_program(vm.create_vcpu(0), GuestProgram().fill(GPA + 4 * PAGE, 4 * PAGE, 0xC3)).ok
        g.fallocate(PUNCH, 0, 2 * PAGE)
        mem.fill(0, PAGE, 1)  # refault
    g.close()
    vm.close()
    m.step_hook = None
    assert len(seen) == 8 and len(design.unmapped_blocks) == 1


def test_zeroing_goes_through_the_mermap_never_the_direct_map() -> None:
    h = model_host("unmapped", trace="full")
    _vm, g = guest_memfd(h, 2)
    with g.mmap(2 * PAGE) as mem:
        mem.fill(0, PAGE, 0x77)
        pfn = g.pfn(0)
        g.fallocate(PUNCH, 0, PAGE)
        assert mem.read(0, 4) == b"\0" * 4  # the refault's folio was zeroed...
        assert g.pfn(0) == pfn  # ...and it is the same page, back off the unmapped list
    evs = events(h, pfn)
    names = [e[1] for e in evs]
    assert not {"kernel_read", "kernel_write", "dmap_set", "dmap_clear"} & set(names)
    zeroes = [e for e in evs if e[1] == "zero_page"]
    assert len(zeroes) == 2 and all(e[2] == {"via": "mermap"} for e in zeroes)
    # Each zeroing maps the page in this CPU's mermap, clears it, and drops the PTE.
    assert names.count("mermap_map") == names.count("mermap_unmap") == 2
    i = names.index("zero_page")
    assert names[i - 1] == "mermap_map" and names[i + 1] == "mermap_unmap"


def test_free_returns_the_page_to_the_unmapped_free_list() -> None:
    h = model_host("unmapped", init_on_free=False)
    m = h.machine
    design = unmapped(h)
    _vm, g = guest_memfd(h, 2)
    with g.mmap(2 * PAGE) as mem:
        mem.fill(0, 2 * PAGE, 0x42)
        pfn = g.pfn(PAGE)
        flushes = m.trace.counts["flush_tlb_kernel_range"]
        g.fallocate(PUNCH, PAGE, PAGE)
    assert design.free_list[-1] == pfn and design.holds_unmapped(m, pfn)
    assert not m.mem.allocated(pfn) and pfn not in m.alloc.freed_stack()
    assert not m.dmap.present(pfn)
    assert m.mem.secret_bytes(pfn) == PAGE  # not zeroed on free: it never returns to the direct map
    assert m.trace.counts["flush_tlb_kernel_range"] == flushes  # no direct-map change, no flush
    m.inv.check_all()
    assert not h.gadget_read(1, pfn)


def test_the_direct_map_changes_a_pageblock_at_a_time_with_one_flush() -> None:
    h = model_host("unmapped")
    m = h.machine
    before = m.meminfo()
    _vm, g = guest_memfd(h, PAGES_PER_PMD + 1)
    with g.mmap((PAGES_PER_PMD + 1) * PAGE) as mem:
        mem.fill(0, PAGES_PER_PMD * PAGE, 1)
        assert m.trace.counts["pageblock_unmapped"] == 1
        assert m.trace.counts["flush_tlb_kernel_range"] == 1
        mem.fill(PAGES_PER_PMD * PAGE, PAGE, 1)  # the 513th page needs a second block
    assert m.trace.counts["pageblock_unmapped"] == m.trace.counts["flush_tlb_kernel_range"] == 2
    assert m.meminfo().direct_map_4k == before.direct_map_4k  # 2 MiB leaves cleared whole: no split


def test_a_mermap_translation_survives_until_the_mapping_is_flushed() -> None:
    """mermap_put() does not flush; AS_MERMAP_STALE makes removal flush every CPU's mermap."""
    h = model_host("unmapped")
    m = h.machine
    design = unmapped(h)
    _vm, g = guest_memfd(h, 2)
    mapping = m.mappings[max(m.mappings)]
    with g.mmap(2 * PAGE) as mem:
        mem.fill(0, 2 * PAGE, 0x99)  # the VMM task runs on cpu0
        pfn = g.pfn(0)
        assert mapping.test(AS_MERMAP_STALE)
        assert design.temporary_mapping_cpus(pfn) == [0]  # the guest's data, through cpu0's mermap
        assert design.mermap.stale() == 2
        g.fallocate(PUNCH, PAGE, PAGE)
    assert not mapping.test(AS_MERMAP_STALE)
    assert design.temporary_mapping_cpus(pfn) == [] and design.mermap.stale() == 0
    assert m.trace.counts["flush_tlb_mermap"] == 1


def test_the_mermap_region_wraps_with_a_local_flush() -> None:
    h = model_host("unmapped", low_ram_mib=256)
    design = unmapped(h)
    _vm, g = guest_memfd(h, MERMAP_CPU_SLOTS + 1)
    with g.mmap((MERMAP_CPU_SLOTS + 1) * PAGE) as mem:
        mem.fill(0, MERMAP_CPU_SLOTS * PAGE, 1)
        assert h.machine.trace.counts["mermap_flush_local"] == 0
        mem.fill(MERMAP_CPU_SLOTS * PAGE, PAGE, 1)
    assert h.machine.trace.counts["mermap_flush_local"] == 1
    assert design.mermap.stale() == 1  # only the page mapped after the wrap


def test_secretmem_gets_unmapped_pages_from_the_page_cache() -> None:
    h = model_host("unmapped")
    m = h.machine
    f = h.memfd_secret()
    f.ftruncate(PAGE)
    mem = f.mmap(PAGE)
    mem.fill(0, PAGE, 0x99)
    pfn = mem.pfn(0)
    assert pfn >> PAGEBLOCK_ORDER in unmapped(h).unmapped_blocks and not m.dmap.present(pfn)
    with pytest.raises(KernelError) as e:
        h.process_vm_readv(mem, 0, PAGE)
    assert e.value.errno == errno.EFAULT
    mem.munmap()
    f.close()
    assert unmapped(h).holds_unmapped(m, pfn) and not m.dmap.present(pfn)


def test_a_mapping_without_the_flag_allocates_mapped_pages() -> None:
    h = model_host("unmapped")
    _vm, g = guest_memfd(h, 1, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    with g.mmap(PAGE) as mem:
        mem.fill(0, PAGE, 1)
        assert h.machine.dmap.present(g.pfn(0))
    assert not unmapped(h).unmapped_blocks


def test_a_free_unmapped_pageblock_is_mapped_back_zeroed_when_mapped_memory_runs_out() -> None:
    h = model_host("unmapped", low_ram_mib=16, init_on_free=False)
    m = h.machine
    design = unmapped(h)
    vm, g = guest_memfd(h, PAGES_PER_PMD)
    with g.mmap(PAGES_PER_PMD * PAGE) as mem:
        mem.fill(0, PAGES_PER_PMD * PAGE, 0x5A)
    g.close()
    vm.close()
    (block,) = design.unmapped_blocks
    frames = range(block << PAGEBLOCK_ORDER, (block + 1) << PAGEBLOCK_ORDER)
    assert design.nr_free[block] == PAGES_PER_PMD and all(m.mem.secret_bytes(p) for p in frames)
    while m.alloc.nr_free:
        h.kernel_alloc()
    assert m.trace.counts["pageblock_mapped"] == 0
    pfn = h.kernel_alloc()  # the mapped lists are empty: the unmapped block comes back
    assert pfn in frames and m.trace.counts["pageblock_mapped"] == 1
    assert not design.unmapped_blocks and not design.free_list
    assert all(m.dmap.present(p) and m.mem.secret_bytes(p) == 0 for p in frames)
    m.inv.check_all()


# --- the slow path: zap on insertion, restore on removal ---------------------------------------------
def test_slow_path_zeroes_then_zaps_on_insertion_and_restores_then_zeroes_on_removal() -> None:
    h = model_host("filemap", trace="full", invariants="record")
    m = h.machine
    _vm, g = guest_memfd(h, 2)
    with g.mmap(2 * PAGE) as mem:
        mem.fill(0, PAGE, 0x55)
        pfn = g.pfn(0)
        assert not m.dmap.present(pfn) and not m.tlb.cached_anywhere(pfn)
        g.fallocate(PUNCH, 0, PAGE)
    names = [e[1] for e in events(h, pfn)]
    add = names.index("pagecache_add")
    assert names.index("zero_page") < names.index("dmap_clear") < add
    removal = names[names.index("pagecache_del"):]
    assert removal.index("dmap_set") < removal.index("zero_page") < removal.index("free_page")
    assert m.dmap.present(pfn) and m.mem.secret_bytes(pfn) == 0 and not m.mem.allocated(pfn)
    assert m.trace.counts["flush_tlb_kernel_range"] == 1  # one per zap; restores need none


# --- invariants, under the lifecycle, `gmemlab run` and `gmemlab check` -------------------------------
@pytest.mark.parametrize(("design", "broken"), [("unmapped", set()),
                                                ("filemap", set())])
def test_lifecycle_verdicts(design: str, broken: set[str]) -> None:
    h = model_host(design, invariants="record", low_ram_mib=64)
    r = run_lifecycle(h, LifecycleConfig(guest_mib=2, vmm_write_mib=1, punch_mib=1,
                                         kernel_reuse_pages=1024))
    assert {name for name, n in r.verdicts.items() if n} == broken
    assert r.crashed is None


def test_gmemlab_run_holds_every_invariant_on_the_fast_path(capsys: pytest.CaptureFixture[str]) -> None:
    small = ["--guest-mib", "4", "--vmm-write-mib", "1", "--punch-mib", "1", "--ram-gib", "1"]
    assert main(["run", *small, "--design", "unmapped"]) == 0
    out = capsys.readouterr().out
    assert "Invariants: all 14 held" in out
    assert main(["run", *small, "--design", "filemap"]) == 0
    assert "not followed (its orders; not failures): invalidate-before-restore" in capsys.readouterr().out


@pytest.mark.parametrize("scenario", [s.name for s in STANDARD if s.name != "ufault-release"])
def test_check_passes_the_fast_path_exhaustively(scenario: str) -> None:
    r = explore(get_scenario(scenario), "unmapped")
    assert r.passed and r.complete, (scenario, r.verdict(), [c.message for c in r.found])


def test_check_reports_the_restore_order_of_the_slow_path_as_rationale() -> None:
    r = explore(get_scenario("fault-punch"), "filemap")
    assert r.passed and r.complete and r.rationale == {"invalidate-before-restore"}
