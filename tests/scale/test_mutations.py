"""An edit to a design's code reaches every run, batched or not.

Seven realistic bugs, each written into v12's or filemap's code in a test-local subclass the
way a reviewer would make them.  For each, the lifecycle below runs with the
batched paths allowed and with them off: the verdicts (which invariants break,
how often, whether the kernel oopsed) must be the same, must differ from
unmodified v12's, and the machine must say that it ran per page and why.

That the test can fail: the same runs with the gate forced open (the batched
paths standing in for code they do not mirror, as before the gate existed)
hide every one of the seven bugs.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import replace

import pytest

from gmemlab.api import run_program
from gmemlab.guest import GuestProgram
from gmemlab.model import Host
from gmemlab.model.designs import DESIGNS
from gmemlab.model.designs.base import (
    Design,
    has_marker,
    inode_no_direct_map,
    kvm_gmem_get_pfn_done,
    kvm_gmem_get_pfn_folio,
    zero_if_not_uptodate,
)
from gmemlab.model.designs.filemap_nodm import FilemapZap, folio_zap_direct_map
from gmemlab.model.designs.v12 import V12
from gmemlab.model.invariants import KernelOops
from gmemlab.model.kvm.guest_memfd import kvm_arch_gmem_invalidate, kvm_arch_gmem_prepare
from gmemlab.model.kvm.kvm_main import Kvm, Memslot
from gmemlab.model.machine import Machine
from gmemlab.model.mm.filemap import AS_NO_DIRECT_MAP, AddressSpace, mapping_no_direct_map
from gmemlab.model.mm.folio import folio_lock, folio_unlock
from gmemlab.model.mm.page_alloc import clear_page
from gmemlab.model.mm.set_memory import set_direct_map_valid_noflush
from gmemlab.model.ranges import MIRRORS
from gmemlab.model.ranges.gate import PATH_LOOPS, Gate, PathGate
from gmemlab.model.ranges.paths import paths_for
from gmemlab.model.task import KGen
from gmemlab.uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_CAP_GUEST_MEMFD_FLAGS,
    KVM_MEM_GUEST_MEMFD,
)
from tests.scale.equivalence import CONFIG

MIB = 1 << 20
GPA = 1 << 32
NDM = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED | GUEST_MEMFD_FLAG_NO_DIRECT_MAP
PUNCH = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


class RestoreOnlyIfMappingFlagged(V12):
    """``->free_folio`` restores only while the folio's mapping still says AS_NO_DIRECT_MAP."""

    def kvm_gmem_free_folio(self, m: Machine, pfn: int) -> KGen[None]:
        yield from kvm_arch_gmem_invalidate(m, pfn)
        mapping = m.folio_mapping(pfn)
        if has_marker(m, pfn) and mapping is not None and mapping.test(AS_NO_DIRECT_MAP):
            yield from self.kvm_gmem_folio_restore_direct_map(m, pfn)


class UnlockBeforeZap(V12):
    """``kvm_gmem_get_pfn()`` drops the folio lock before the zap and the prepare."""

    def kvm_gmem_get_pfn(self, m: Machine, kvm: Kvm, slot: Memslot, gfn: int) -> KGen[tuple[int, int]]:
        file, folio = yield from kvm_gmem_get_pfn_folio(m, slot, gfn)
        if folio < 0:
            return (yield from kvm_gmem_get_pfn_done(m, file, folio, -1))
        yield from zero_if_not_uptodate(m, folio, "kvm_gmem_get_pfn")
        yield from folio_unlock(m, folio)
        r = 0
        if inode_no_direct_map(m, folio):
            r = yield from self.kvm_gmem_folio_zap_direct_map(m, folio)
        if not r:
            r = yield from kvm_arch_gmem_prepare(m, kvm, gfn, folio)
        yield from folio_lock(m, folio)  # for the unlock in kvm_gmem_get_pfn_done()
        return (yield from kvm_gmem_get_pfn_done(m, file, r, folio))


class RestoreOnlyIfReclaimed(V12):
    """The restore is skipped when the arch invalidate hook had nothing to reclaim."""

    def kvm_gmem_free_folio(self, m: Machine, pfn: int) -> KGen[None]:
        reclaimed = bool(m.mem.guest_owned[pfn])
        yield from kvm_arch_gmem_invalidate(m, pfn)
        if reclaimed and has_marker(m, pfn):
            yield from self.kvm_gmem_folio_restore_direct_map(m, pfn)


class ZapWithoutFlush(V12):
    """``folio_zap_direct_map()`` forgets the kernel TLB flush."""

    def folio_zap_direct_map(self, m: Machine, folio: int) -> KGen[int]:
        return (yield from set_direct_map_valid_noflush(m, folio, 1, False))


class GuestFaultDoesNotZap(V12):
    """Only the user fault zaps; ``kvm_gmem_get_pfn()`` hands the folio out mapped."""

    def kvm_gmem_get_pfn(self, m: Machine, kvm: Kvm, slot: Memslot, gfn: int) -> KGen[tuple[int, int]]:
        file, folio = yield from kvm_gmem_get_pfn_folio(m, slot, gfn)
        if folio < 0:
            return (yield from kvm_gmem_get_pfn_done(m, file, folio, -1))
        yield from zero_if_not_uptodate(m, folio, "kvm_gmem_get_pfn")
        r = yield from kvm_arch_gmem_prepare(m, kvm, gfn, folio)
        return (yield from kvm_gmem_get_pfn_done(m, file, r, folio))


class FilemapZeroesAfterZap(FilemapZap):
    """The insertion zaps first and zeroes after, through the entry it just cleared."""

    def prep_add_unmapped_folio(self, m: Machine, mapping: AddressSpace, folio: int) -> KGen[int]:
        if not mapping_no_direct_map(mapping):
            return 0
        r = yield from folio_zap_direct_map(m, folio)
        yield from clear_page(m, folio, "folio_zero_segment")
        if not r:
            yield from self.mark_zeroed(m, folio)
        return r


class FilemapZapsWithoutFlush(FilemapZap):
    """The insertion zaps without the flush (the zeroing CPU keeps its translation)."""

    def prep_add_unmapped_folio(self, m: Machine, mapping: AddressSpace, folio: int) -> KGen[int]:
        if not mapping_no_direct_map(mapping):
            return 0
        yield from clear_page(m, folio, "folio_zero_segment")
        r = yield from set_direct_map_valid_noflush(m, folio, 1, False)
        if not r:
            yield from self.mark_zeroed(m, folio)
        return r


MUTATIONS: list[type[Design]] = [RestoreOnlyIfMappingFlagged, UnlockBeforeZap, RestoreOnlyIfReclaimed,
                                 ZapWithoutFlush, GuestFaultDoesNotZap, FilemapZeroesAfterZap,
                                 FilemapZapsWithoutFlush]


def lifecycle(h: Host) -> None:
    """Guest first touch, VMM writes, punch-hole and refault, teardown, frames reused."""
    vm = h.open_kvm().create_vm()
    gmem = vm.create_guest_memfd(6 * MIB, NDM)
    mem = gmem.mmap(6 * MIB)
    vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GPA, 6 * MIB, mem.addr, gmem, 0)
    vcpu = vm.create_vcpu(0, cpu=0)
    run_program(vcpu, GuestProgram().touch(GPA, 4 * MIB, value=7))
    mem.fill(4 * MIB, 2 * MIB, 0x5A)
    h.gadget_read(1, gmem.pfn(0))
    gmem.fallocate(PUNCH, MIB, 2 * MIB)
    run_program(vcpu, GuestProgram().touch(GPA + MIB, MIB))
    mem.munmap()
    gmem.close()
    vcpu.close()
    vm.close()
    for _ in range(16):
        h.kernel_alloc(0)


def verdict(design: Design, *, batched: bool, force: bool = False) -> tuple[Counter[str], Gate]:
    host = Host(Machine(replace(CONFIG, range_paths=batched), design=design))
    if force:
        mirror = "filemap" if isinstance(design, FilemapZap) else "v12"
        host.m._gate = Gate(tuple(PathGate(path, mirror) for path in PATH_LOOPS))
        host.m._batched = paths_for(host.m._gate)
    try:
        lifecycle(host)
    except Exception as e:  # an oops ends the run: part of the verdict
        return Counter({f"crash:{type(e).__name__}": 1}) + Counter(
            v.invariant.name for v in host.m.inv.violations), host.m.gate
    return Counter(v.invariant.name for v in host.m.inv.violations), host.m.gate


def test_unmutated_v12_is_batched_and_clean() -> None:
    found, gate = verdict(V12(), batched=True)
    assert all(p.mirror == "v12" for p in gate.paths), gate.reason
    assert not found


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda c: c.__name__)
def test_a_mutation_changes_both_runs_alike(mutation: type[Design]) -> None:
    per_page, _ = verdict(mutation(), batched=False)
    batched, gate = verdict(mutation(), batched=True)
    assert per_page, f"{mutation.__name__} broke nothing: the lifecycle does not reach it"
    assert batched == per_page, f"batched {dict(batched)} != per page {dict(per_page)}"
    changed = next(n for n in vars(mutation) if not n.startswith("__"))
    # The method, or the slot that holds it (filemap_add_hook = self.prep_add_unmapped_folio).
    held = {f"design.{k}" for k, v in vars(mutation()).items() if getattr(v, "__name__", "") == changed}
    assert ({f"design.{changed}"} | held) & set(gate.differs), gate
    assert "not code the batched paths mirror" in gate.reason


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda c: c.__name__)
def test_without_the_gate_the_batched_run_would_hide_it(mutation: type[Design]) -> None:
    per_page, _ = verdict(mutation(), batched=False)
    forced, _ = verdict(mutation(), batched=True, force=True)
    assert forced != per_page


def test_the_pins_hold() -> None:
    """The batched paths mirror the code as it is: if this fails, the code changed under them.

    Bring ``gmemlab/model/ranges`` in line with the change, make ``tests/scale``
    pass, then ``python -m gmemlab.model.ranges.pin --write``.
    """
    from gmemlab.model.designs import get_design
    from gmemlab.model.ranges.gate import judge

    for name in MIRRORS:
        gate = judge(get_design(name))
        assert all(p.mirror == name for p in gate.paths), gate.reason


GIB = 1 << 30


def spread_lifecycle(h: Host) -> None:
    """A 3 GiB guest touched in runs that cross 2 MiB and 1 GiB boundaries, written by the VMM
    in others, punched, torn down; a design that oopses (v7) stops where it oopsed."""
    with contextlib.suppress(KernelOops):
        _spread_lifecycle(h)


def _spread_lifecycle(h: Host) -> None:
    vm = h.open_kvm().create_vm()
    gmem = vm.create_guest_memfd(3 * GIB, vm.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS) & NDM)
    mem = gmem.mmap(3 * GIB)
    vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GPA, 3 * GIB, mem.addr, gmem, 0)
    vcpu = vm.create_vcpu(0, cpu=0)
    prog = GuestProgram()
    for g in range(3):
        for k in (0, 5, 511):
            prog.touch(GPA + g * GIB + k * 2 * MIB + 2 * MIB - 8 * 4096, 24 * 4096, value=g + 1)
    prog.touch(GPA + GIB - MIB, 2 * MIB, value=9)  # across the first 1 GiB boundary
    run_program(vcpu, prog)
    for g in range(3):
        mem.fill(g * GIB + 100 * 2 * MIB, 16 * 4096, 0x5A)
    gmem.fallocate(PUNCH, GIB - 2 * MIB, 4 * MIB)
    run_program(vcpu, GuestProgram().touch(GPA + GIB - 2 * MIB, 64 * 4096))
    mem.munmap()
    gmem.close()
    vcpu.close()
    vm.close()


@pytest.mark.parametrize("design", sorted(DESIGNS))
def test_every_design_both_ways(design: str) -> None:
    """Batched allowed or not, every design leaves the same trace and the same state; the
    designs the batched paths do not mirror say so and run per page."""
    from tests.scale.equivalence import first_difference, run_both

    per_page, batched = run_both(spread_lifecycle, design=design, ram_gib=4)
    assert per_page == batched, first_difference(per_page, batched)
