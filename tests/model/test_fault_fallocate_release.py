"""The guest_memfd user fault, fallocate, punch-hole and release on the model (v12).

series-spec §3.2 (user fault), §3.5 (free path), §2.4 (fallocate), §9 (per-folio
states); anchors §B.4.
"""

from __future__ import annotations

import errno

import pytest

from gmemlab.api import KernelError, SigBus
from gmemlab.model.host import GuestMemfd, Host
from gmemlab.model.mm.memmap import PG_uptodate
from gmemlab.uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
)
from tests.conftest import model_host, skip_to_large_leaf

PAGE = 4096
ALL = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED | GUEST_MEMFD_FLAG_NO_DIRECT_MAP
KEEP, PUNCH = FALLOC_FL_KEEP_SIZE, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


def setup(pages: int = 4, flags: int = ALL, **config: object) -> tuple[Host, GuestMemfd]:
    h = model_host(**config)  # type: ignore[arg-type]
    vm = h.open_kvm().create_vm()
    return h, vm.create_guest_memfd(pages * PAGE, flags)


def test_user_fault_zeroes_then_zaps_then_maps() -> None:
    h, g = setup()
    m = h.machine
    with g.mmap(4 * PAGE) as mem:
        mem.write(PAGE, b"secret")
        pfn = g.pfn(PAGE)
        assert not m.dmap.present(pfn)
        assert m.mem.private[pfn] & 1  # KVM_GMEM_FOLIO_NO_DIRECT_MAP
        assert m.mem.flags[pfn] & PG_uptodate
        assert mem.read(PAGE, 8) == b"secret\0\0"
        events = [e.event for e in m.trace.tail(200, pfn)]
        assert events.index("zero_page") < events.index("dmap_clear") < events.index("pte_map")
        assert not m.tlb.cached_anywhere(pfn)


def test_fault_without_the_flag_keeps_the_direct_map() -> None:
    h, g = setup(flags=GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    with g.mmap(PAGE) as mem:
        mem.fill(0, PAGE, 1)
        assert h.machine.dmap.present(g.pfn(0))
        assert h.machine.trace.counts["dmap_clear"] == 0


def test_sigbus_offsets() -> None:
    _h, g = setup(pages=2)
    with g.mmap(4 * PAGE) as mem:
        with pytest.raises(SigBus) as e:
            mem.fill(0, 4 * PAGE, 0xAA)
        assert e.value.addr == mem.addr + 2 * PAGE
        assert mem.read(0, 2 * PAGE) == b"\xaa" * 2 * PAGE


def test_zap_failure_leaves_a_clean_folio_and_the_fault_retries() -> None:
    """I11: ENOMEM from the split -> VM_FAULT_OOM; folio uptodate, unmarked, mapped; retried."""
    h, g = setup()
    m = h.machine
    skip_to_large_leaf(h)
    m.faults.arm("pt_alloc", times=1)
    with g.mmap(PAGE) as mem:
        mem.fill(0, PAGE, 7)  # the first fault returns VM_FAULT_OOM, the retry zaps
        assert m.faults.fired["pt_alloc"] == 1
        assert any(e.event == "fault_error" for e in m.trace)
        assert not m.dmap.present(g.pfn(0))
    h2, g2 = setup()
    skip_to_large_leaf(h2)
    h2.machine.faults.arm("pt_alloc", times=-1)
    with g2.mmap(PAGE) as mem, pytest.raises(KernelError) as e:
        mem.fill(0, PAGE, 7)
    assert e.value.errno == errno.ENOMEM
    pfn = g2.pfn(0)
    mm = h2.machine
    assert pfn >= 0 and mm.dmap.present(pfn) and not mm.mem.private[pfn] & 1
    assert mm.mem.flags[pfn] & PG_uptodate  # zeroed before the zap failed, stays so


def test_fallocate_allocates_without_zeroing_or_zapping() -> None:
    """The lazy window: allocated folios stay in the direct map until first mapped."""
    h, g = setup(pages=8)
    m = h.machine
    g.fallocate(KEEP, 0, 8 * PAGE)
    pfns = [g.pfn(i * PAGE) for i in range(8)]
    assert all(p >= 0 and m.dmap.present(p) for p in pfns)
    assert not any(m.mem.flags[p] & PG_uptodate for p in pfns)
    assert m.trace.counts["zero_page"] == 0 and m.trace.counts["dmap_clear"] == 0


def test_fallocate_errors() -> None:
    _h, g = setup()
    cases = [
        (0, 0, PAGE, errno.EOPNOTSUPP),
        (FALLOC_FL_PUNCH_HOLE, 0, PAGE, errno.EOPNOTSUPP),
        (KEEP | 0x10, 0, PAGE, errno.EOPNOTSUPP),
        (KEEP, 1, PAGE, errno.EINVAL),
        (KEEP, 0, PAGE + 1, errno.EINVAL),
        (KEEP, 4 * PAGE, PAGE, errno.EINVAL),
    ]
    for mode, off, length, err in cases:
        with pytest.raises(KernelError) as e:
            g.fallocate(mode, off, length)
        assert e.value.errno == err, (mode, off, length)
    g.fallocate(PUNCH, 8 * PAGE, PAGE)  # punch-hole never checks i_size


def test_allocate_interrupted_by_a_signal() -> None:
    h, g = setup(pages=4)
    h.machine.faults.arm("signal_pending", after=2)
    with pytest.raises(KernelError) as e:
        g.fallocate(KEEP, 0, 4 * PAGE)
    assert e.value.errno == errno.EINTR
    assert [g.pfn(i * PAGE) >= 0 for i in range(4)] == [True, True, False, False]


def test_punch_hole_restores_frees_and_refaults_zeroed() -> None:
    h, g = setup()
    m = h.machine
    with g.mmap(4 * PAGE) as mem:
        mem.fill(0, 4 * PAGE, 0x66)
        pfn = g.pfn(PAGE)
        g.fallocate(PUNCH, PAGE, PAGE)
        assert g.pfn(PAGE) == -1
        assert m.dmap.present(pfn) and not m.mem.allocated(pfn)
        assert m.mem.secret_bytes(pfn) == PAGE  # guest data outlives the folio
        events = [e.event for e in m.trace.tail(60, pfn)]
        assert events.index("pte_unmap") < events.index("pagecache_del") < events.index(
            "invalidate") < events.index("dmap_set") < events.index("free_page")
        assert mem.read(PAGE, PAGE) == bytes(PAGE)
        assert g.pfn(PAGE) == pfn  # the LIFO allocator hands the same frame back


def test_init_on_free_zeroes_freed_frames() -> None:
    h, g = setup(init_on_free=True)
    with g.mmap(PAGE) as mem:
        mem.fill(0, PAGE, 0x66)
        pfn = g.pfn(0)
        g.fallocate(PUNCH, 0, PAGE)
        assert h.machine.mem.secret_bytes(pfn) == 0


def test_release_waits_for_the_last_reference() -> None:
    """A mapping holds the file: closing the fd frees nothing until the munmap (§fs)."""
    h, g = setup()
    m = h.machine
    mem = g.mmap(4 * PAGE)
    mem.fill(0, 4 * PAGE, 1)
    pfns = [g.pfn(i * PAGE) for i in range(4)]
    g.close()
    assert all(m.mem.allocated(p) for p in pfns)
    mem.munmap()
    assert not any(m.mem.allocated(p) for p in pfns)
    assert all(m.dmap.present(p) for p in pfns)
    assert m.trace.counts["evict_inode"] == 1


def test_double_close_is_harmless() -> None:
    _h, g = setup()
    g.close()
    g.close()
    with pytest.raises(KernelError) as e:
        g.fileno()
    assert e.value.errno == errno.EBADF
