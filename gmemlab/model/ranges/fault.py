"""Guest and VMM accesses to guest_memfd memory, a run of pages at a time.

:func:`guest_access` stands for the loop of ``_run_touch()``/``_run_range()``
(``gmemlab.model.kvm.vcpu``) over a run of gfns of one guest_memfd-only
memslot: per page ``guest_translate()``, which faults an unmapped gfn through
``kvm_mmu_page_fault()`` -> ``kvm_gmem_get_pfn()`` (the folio steps of
:mod:`.folios`, then ``kvm_arch_gmem_prepare()``, unlock, the stage-2 entry
and ``kvm_release_faultin_page()``), then the guest's byte access.

:func:`user_access` stands for ``walk_user()`` (``gmemlab.model.mm.memory``)
over a run of pages of one guest_memfd mapping: per page
``get_pte_or_fault()``, which faults a missing PTE through
``handle_mm_fault()`` -> ``kvm_gmem_fault_user_mapping()`` (the folio steps)
-> ``finish_fault()`` (the PTE, then unlock), then the access itself.

Both return how far they got; the caller's loop goes on page by page from
there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from gmemlab.guest import Check, Fill, Touch
from gmemlab.model.kvm.tdx import is_td
from gmemlab.model.mm.memmap import GUEST_OWNED_SNP, PG_locked
from gmemlab.model.mm.xarray import EMPTY
from gmemlab.model.ranges import CHUNK, FIRST_WINDOW, checks, folios, mirror, usable
from gmemlab.model.ranges.events import Events, listed
from gmemlab.uapi import GUEST_MEMFD_FLAG_INIT_SHARED, PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from gmemlab.model.kvm.vcpu import Vcpu
    from gmemlab.model.machine import Machine
    from gmemlab.model.mm.memory import BulkOp, Process, UserOp, Vma


def _pieces(start: int, end: int, n: int) -> tuple[int, int]:
    """For [start, end) cut after ``n`` pages: offset in the first page, end in the last."""
    last_page = ((start >> PAGE_SHIFT) + n - 1) << PAGE_SHIFT
    return start & (PAGE_SIZE - 1), min(end - last_page, PAGE_SIZE)


def guest_access(m: Machine, vcpu: Vcpu, op: Touch | Fill | Check) -> bool:
    """Run ``op`` from ``vcpu.off`` over the pages that go straight through.

    Returns False when the page at ``vcpu.off`` must go through the per-page path
    (a split, an error, a failed check, an exit...), True when the caller should
    just look at ``vcpu.off`` again (the op is done, or a memslot ended).
    """
    if not usable(m) or vcpu.mmio_pending >= 0:
        return False
    kvm = vcpu.kvm
    gfn0 = (op.gpa + vcpu.off) >> PAGE_SHIFT
    slot = kvm.gfn_to_memslot(gfn0)
    if slot is None or not slot.gmem_only or not slot.has_gmem() or is_td(m, kvm):
        return False
    file = slot.gmem_file
    if (file is None or file.f_count == 0 or kvm.mmu_invalidate_in_progress
            or ("mmu_lock", kvm.id) in m.locks.held):
        return False
    index0 = gfn0 - slot.base_gfn + slot.gmem_pgoff
    binding = next((b for b in file.private_data.bindings if b.start <= index0 < b.end), None)
    if binding is None or binding.slot is not slot:
        return False
    end = op.gpa + op.length
    last = min((end - 1) >> PAGE_SHIFT, slot.base_gfn + slot.npages - 1,
               binding.end - 1 - slot.gmem_pgoff + slot.base_gfn)
    window = FIRST_WINDOW
    while True:
        gpa = op.gpa + vcpu.off
        gfn0 = gpa >> PAGE_SHIFT
        n = min(last - gfn0 + 1, window)
        mapped = kvm.spte.load_range(gfn0, n)
        r = folios.plan(m, file.inode, gfn0 - slot.base_gfn + slot.gmem_pgoff, mapped == EMPTY,
                        hwpoison=True, arch_prepare=True)
        if isinstance(op, Check) and r.n:
            r.prefix(_first_failed_check(m, r, mapped, gpa, end, op.value))
        if r.n:
            _guest_run(m, vcpu, op, r, mapped, gpa, end)
        if r.n < n:
            return False
        if gfn0 + n > last:
            return True
        window = min(2 * window, CHUNK)


def _guest_run(m: Machine, vcpu: Vcpu, op: Touch | Fill | Check, r: folios.FolioRun,
               mapped: NDArray[np.int64], gpa: int, end: int) -> None:
    """The pages of ``r``: the faults, then the guest's accesses; advances ``vcpu.off``."""
    gfn0 = gpa >> PAGE_SHIFT
    _guest_fault(m, vcpu, r, gfn0)
    pfns = np.where(r.fault, r.pfn, mapped[: r.n])
    poff, last = _pieces(gpa, end, r.n)
    mem = m.mem
    if isinstance(op, Touch):
        if op.write:
            mem.memset_many(pfns[:1], poff, 1, op.value, secret=True)
            mem.memset_many(pfns[1:], 0, 1, op.value, secret=True)
    elif isinstance(op, Fill):
        mem.memset(int(pfns[0]), poff, (last if r.n == 1 else PAGE_SIZE) - poff, op.value, secret=True)
        if r.n > 1:
            mem.memset_pages(pfns[1:-1], op.value, secret=True)
            mem.memset(int(pfns[-1]), 0, last, op.value, secret=True)
    vcpu.off = min(((gfn0 + r.n) << PAGE_SHIFT) - op.gpa, op.length)


def _first_failed_check(m: Machine, r: folios.FolioRun, mapped: NDArray[np.int64], start: int,
                        end: int, value: int) -> int:
    """The first page of ``r`` whose bytes in [start, end) will not all be ``value``."""
    mem = m.mem
    n = r.n
    pfns = np.where(r.fault, r.pfn, mapped[:n])
    fresh = r.fault & r.zero  # zeros once faulted
    bad = fresh & (value != 0)
    mid = np.arange(1, n - 1)
    mid = mid[~fresh[mid]]
    hit = mem.first_mismatch(pfns[mid], 0, PAGE_SIZE, value)
    if hit >= 0:
        bad[mid[hit]] = True
    poff, last = _pieces(start, end, n)
    for i in {0, n - 1}:
        if not fresh[i]:
            lo = poff if i == 0 else 0
            hi = last if i == n - 1 else PAGE_SIZE
            bad[i] = mem.mismatch(int(pfns[i]), lo, hi - lo, value) >= 0
    return folios.first(bad)


def _guest_fault(m: Machine, vcpu: Vcpu, r: folios.FolioRun, gfn0: int) -> None:
    """``kvm_mmu_page_fault()`` for the faulting pages of ``r``."""
    kvm = vcpu.kvm
    f = r.fault
    pfn = r.pfn[f]
    ev = Events(m, r.pfn)
    v = m.mem.views()

    def prepare(where: NDArray[np.bool_]) -> None:
        """``kvm_arch_gmem_prepare()`` for the pages ``where`` marks."""
        pp = r.pfn[where]
        checks.on_arch_prepare(m, pp, ev, where)
        if m.profile.has_arch_gmem_prepare(kvm.vm_type):
            v.guest_owned[pp] = GUEST_OWNED_SNP
        rmp = listed(v.guest_owned[np.where(where, r.pfn, 0)] != 0)
        ev.add("kvm_arch_gmem_prepare", "prepare", where, lambda i: {"gfn": gfn0 + i, "rmp": rmp(i)})

    if mirror(m).prepare_first:
        # kvm_gmem_prepare_folio() for a folio not uptodate: zero, prepare; then the zap
        folios.run(m, r, ev, "kvm_gmem_prepare_folio", before_zap=lambda: prepare(r.zero))
    else:
        folios.run(m, r, ev, "kvm_gmem_get_pfn")
        prepare(f)
    # kvm_gmem_get_pfn_done() (unlock, fput)
    v.flags[pfn] &= ~np.uint8(PG_locked)
    checks.on_folio_unlock(m, pfn, ev, f)
    ev.add("kvm_gmem_get_pfn", "get_pfn", f)
    # the stage-2 entry, then kvm_release_faultin_page()
    kvm.spte.store_range(gfn0, np.where(f, r.pfn, EMPTY))
    v.s2count[pfn] += 1
    ev.add("kvm_mmu_page_fault", "spte_map", f, lambda i: {"vm": kvm.id, "gfn": gfn0 + i})
    checks.on_handout(m, pfn, "stage-2 mapping", ev, f, _cached_at_handout(m, r))
    v.refcount[pfn] -= 1
    ev.emit()
    vcpu.stats["pf_taken"] += len(pfn)
    vcpu.stats["pf_fixed"] += len(pfn)


def _cached_at_handout(m: Machine, r: folios.FolioRun) -> NDArray[np.bool_] | None:
    """Which faulting pages of ``r`` a CPU caches when mapped, if the TLBs now do not tell."""
    if mirror(m).flushes:
        return None  # every zap flushed its page: the TLBs' state now is the state then
    return folios.stale_at_handout(r)[r.fault]


def user_access(m: Machine, proc: Process, addr: int, length: int, done: int, write: bool,
                op: UserOp, bulk: BulkOp | None) -> tuple[int, bool]:
    """``walk_user()`` from ``addr + done`` over the pages that go straight through.

    Returns the bytes done, and whether the caller should just look again (else
    the page after them goes through the per-page path).
    """
    if not usable(m):
        return 0, False
    vma = proc.mm.find_vma(addr + done)
    if vma is None or vma.file is None or vma.fault != m.design.kvm_gmem_fault_user_mapping:
        return 0, False
    inode = vma.file.inode
    end = min(addr + length, vma.end)
    last = (end - 1 - vma.start) >> PAGE_SHIFT
    # kvm_gmem_fault_user_mapping() answers SIGBUS past i_size and without INIT_SHARED.
    size = inode.size >> PAGE_SHIFT if inode.private & GUEST_MEMFD_FLAG_INIT_SHARED else 0
    window = FIRST_WINDOW
    start = done
    while True:
        a = addr + done
        page0 = (a - vma.start) >> PAGE_SHIFT
        n = min(last - page0 + 1, window)
        ptes = vma.ptes.load_range(page0, n)
        fault = ptes == EMPTY
        index0 = vma.pgoff + page0
        sigbus = np.flatnonzero(fault[max(size - index0, 0):])
        k = n if not len(sigbus) else max(size - index0, 0) + int(sigbus[0])
        r = folios.plan(m, inode, index0, fault[:k], hwpoison=False)
        if r.n:
            _user_run(m, vma, r, ptes, page0)
            stop = min(vma.start + ((page0 + r.n) << PAGE_SHIFT), addr + length)
            _apply(np.where(r.fault, r.pfn, ptes[: r.n]), a, stop, done, op, bulk)
            done += stop - a
        if r.n < n:
            return done - start, False
        if page0 + n > last:
            return done - start, True
        window = min(2 * window, CHUNK)


def _user_run(m: Machine, vma: Vma, r: folios.FolioRun, ptes: NDArray[np.int64], page0: int) -> None:
    """``handle_mm_fault()`` -> ``kvm_gmem_fault_user_mapping()`` -> ``finish_fault()``."""
    f = r.fault
    pfn = r.pfn[f]
    if not len(pfn):
        return
    ev = Events(m, r.pfn)
    folios.run(m, r, ev, "kvm_gmem_fault_user_mapping")
    m.trace.count("user_fault", len(pfn))
    # finish_fault(): the PTE (with the fault's reference), then unlock
    vma.ptes.store_range(page0, np.where(f, r.pfn, EMPTY))
    v = m.mem.views()
    v.mapcount[pfn] += 1
    base = vma.start + (page0 << PAGE_SHIFT)
    ev.add("finish_fault", "pte_map", f, lambda i: {"addr": base + (i << PAGE_SHIFT)})
    checks.on_handout(m, pfn, "user PTE", ev, f, _cached_at_handout(m, r))
    v.flags[pfn] &= ~np.uint8(PG_locked)
    checks.on_folio_unlock(m, pfn, ev, f)
    ev.emit()


def _apply(pfns: NDArray[np.int64], start: int, end: int, boff: int, op: UserOp,
           bulk: BulkOp | None) -> None:
    """The access itself, page piece by page piece (whole pages through ``bulk`` if given)."""
    n = len(pfns)
    poff, last = _pieces(start, end, n)
    pl = pfns.tolist()

    def piece(i: int) -> None:
        nonlocal boff
        lo = poff if i == 0 else 0
        hi = last if i == n - 1 else PAGE_SIZE
        op(pl[i], lo, boff, hi - lo)
        boff += hi - lo

    # Pages [s, e) are whole: they go to bulk, if there is one.
    s = 0 if poff == 0 else 1
    e = n if last == PAGE_SIZE else n - 1
    if bulk is None or e <= s:
        s = e = n
    for i in range(s):
        piece(i)
    if bulk is not None and e > s:
        bulk(pfns[s:e], boff)
        boff += (e - s) * PAGE_SIZE
    for i in range(e, n):
        piece(i)
