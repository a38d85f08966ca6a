"""kvm-clock and the ``gfn_to_pfn_cache`` it writes through (``virt/kvm/pfncache.c``).

Mainline (v6.18, unchanged in kvm/next), read side by side with the model:

* ``kvm_write_system_time()`` (``arch/x86/kvm/x86.c``): the WRMSR of
  ``MSR_KVM_SYSTEM_TIME_NEW`` stores the value, requests a clock update and, if the
  enable bit is set, calls ``kvm_gpc_activate(&vcpu->arch.pv_time, gpa,
  sizeof(struct pvclock_vcpu_time_info))``.  Its result is ignored: the MSR write
  succeeds whatever happens to the cache.
* ``__kvm_gpc_activate()`` refuses a pvclock that would cross its page with -EINVAL
  before touching the cache (``kvm_gpc_is_valid_len()``); ``__kvm_gpc_refresh()``
  looks the gpa's memslot and hva up (no slot, or a read-only one:
  ``KVM_HVA_ERR_RO_BAD``, -EFAULT), and ``hva_to_pfn_retry()`` resolves it with
  ``hva_to_pfn()`` (GUP, ``FOLL_WRITE``; refused for an ``AS_NO_DIRECT_MAP``
  mapping since v12 04-06), maps it with ``gpc_map()`` = ``kmap()``, the page's
  direct-map address, retries if an invalidation raced
  (``mmu_notifier_retry_cache()``), and drops the page reference: MMU-notifier
  invalidation (``gfn_to_pfn_cache_invalidate_start()``) clears ``valid`` and keeps
  the mapping.  On failure the cache is left invalid with no mapping; a mapping of
  another pfn is unmapped (``gpc_unmap()``).
* ``kvm_setup_guest_pvclock()`` (from ``kvm_guest_time_update()`` on
  ``KVM_REQ_CLOCK_UPDATE``, if ``pv_time.active``): ``while (!kvm_gpc_check())
  { if (kvm_gpc_refresh()) return; }``.  A refresh that fails returns silently: the
  guest's pvclock is never written, and the guest reads whatever its page held.
  With NO_DIRECT_MAP guest_memfd behind the slot that is every time (the v5 FAQ's
  kvm-clock gap).

Firecracker's 6.18 kernel carries Takahiro Itazuri's "KVM: pfncache: Add guest_memfd
support to pfncache" (``linux_patches/11-kvm-clock/0040``-``0046``, the RFC after
``20260226135309.29493-1-itazur@amazon.com``; v4 is
``20260420154720.29012-1-itazur@amazon.com``): 0041 resolves a gmem-backed gpa with
``kvm_gmem_get_pfn()``, 0042 maps a page of an ``AS_NO_DIRECT_MAP`` mapping with
``vmap()`` (and ``vunmap()`` in ``gpc_unmap()``), 0046 invalidates caches on
guest_memfd invalidation.  Those are :class:`~gmemlab.model.designs.base.Design`
hooks (``gpc_to_pfn``, ``gpc_map``, ``gpc_unmap``,
``pfncache_gmem``, which also turns on 0046), so a design carries them or not.

Our choices: the clock update the WRMSR requests is done at once, not at the next
``vcpu_enter_guest()``, and no later update is modelled (vCPU migration,
master-clock updates), so a cache lives from the WRMSR to the next WRMSR or the
vCPU's destruction; the pvclock fields other than ``version`` are written as
zero (the model has no TSC).
"""

from __future__ import annotations

from dataclasses import dataclass
from errno import EFAULT, EINVAL
from typing import TYPE_CHECKING

from gmemlab.model.mm.folio import folio_put
from gmemlab.model.mm.tlb import kernel_access
from gmemlab.model.task import WAIT, KGen
from gmemlab.uapi import KVM_MEM_READONLY, PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from gmemlab.model.kvm.kvm_main import Kvm, Memslot
    from gmemlab.model.kvm.vcpu import Vcpu
    from gmemlab.model.machine import Machine

PVCLOCK_SIZE = 32  # sizeof(struct pvclock_vcpu_time_info)


@dataclass(slots=True)
class GfnToPfnCache:
    """``struct gfn_to_pfn_cache`` (``include/linux/kvm_types.h``): ``vcpu->arch.pv_time``."""

    gpa: int = -1
    uhva: int = 0
    memslot: Memslot | None = None  # with the kernel's memslots generation, a lookup key
    active: bool = False
    valid: bool = False
    pfn: int = -1  # KVM_PFN_ERR_FAULT while there is no mapping
    vmap: bool = False  # khva is a vmap() alias (Firecracker 0042), not kmap()'s direct map
    refresh_err: int = 0  # what the last refresh returned; x86.c never looks


def kvm_write_system_time(m: Machine, vcpu: Vcpu, gpa: int) -> KGen[int]:
    """``kvm_write_system_time()`` with the enable bit set, then the clock update it requests.

    Returns 0, as the WRMSR does: ``kvm_gpc_activate()``'s result is dropped and
    ``kvm_setup_guest_pvclock()`` fails silently.  What happened is in
    ``vcpu.pv_time`` (``refresh_err``) and in the trace, as it is in the kernel's
    tracepoints only.
    """
    gpc = vcpu.pv_time
    gpc.refresh_err = yield from kvm_gpc_activate(m, vcpu, gpc, gpa)
    yield from kvm_setup_guest_pvclock(m, vcpu, gpc)
    return 0


def kvm_gpc_activate(m: Machine, vcpu: Vcpu, gpc: GfnToPfnCache, gpa: int) -> KGen[int]:
    """``kvm_gpc_activate()`` -> ``__kvm_gpc_activate()``: a bad length leaves the cache as it was."""
    if (gpa & (PAGE_SIZE - 1)) + PVCLOCK_SIZE > PAGE_SIZE:  # kvm_gpc_is_valid_len()
        m.trace.emit("kvm_gpc_activate", "pfncache_fail", -1, {"gpa": gpa, "err": "EINVAL"})
        return -EINVAL
    gpc.active = True
    return (yield from __kvm_gpc_refresh(m, vcpu, gpc, gpa))


def kvm_gpc_check(kvm: Kvm, gpc: GfnToPfnCache) -> bool:
    """``kvm_gpc_check()``: active, valid, and the memslots unchanged (the generation: here
    the gfn's memslot is still the one looked up); the length was checked with the gpa."""
    return (gpc.active and gpc.valid and gpc.pfn >= 0
            and kvm.gfn_to_memslot(gpc.gpa >> PAGE_SHIFT) is gpc.memslot)


def __kvm_gpc_refresh(m: Machine, vcpu: Vcpu, gpc: GfnToPfnCache, gpa: int) -> KGen[int]:
    """``__kvm_gpc_refresh()``: resolve and map ``gpa`` unless the cache already holds it."""
    kvm = vcpu.kvm
    fn = "kvm_gpc_refresh"
    yield ("gpc", (kvm.id, vcpu.vcpu_id))
    old_pfn, old_vmap = gpc.pfn, gpc.vmap
    gfn = gpa >> PAGE_SHIFT
    # The kernel redoes the lookup when the gpa or the memslots generation changed; doing it
    # every time finds the same slot and hva otherwise.
    slot = kvm.gfn_to_memslot(gfn)
    gpc.gpa, gpc.memslot = gpa, slot
    ret = 0
    if slot is None or slot.flags & KVM_MEM_READONLY:
        ret = -EFAULT  # kvm_is_error_hva(): no slot, or KVM_HVA_ERR_RO_BAD
    else:
        uhva = slot.userspace_addr + ((gfn - slot.base_gfn) << PAGE_SHIFT)
        hva_change = gpc.uhva != uhva
        gpc.uhva = uhva
        if not gpc.valid or hva_change:
            ret = yield from gpc_to_pfn_retry(m, kvm, gpc, slot, gfn)
    if ret:
        gpc.valid, gpc.pfn, gpc.vmap = False, -1, False
        m.trace.emit(fn, "pfncache_fail", -1, {"gpa": gpa, "err": "EFAULT"})
    if old_pfn >= 0 and old_pfn != gpc.pfn:
        yield from m.design.gpc_unmap(m, old_pfn, old_vmap)
    return ret


def gpc_to_pfn_retry(m: Machine, kvm: Kvm, gpc: GfnToPfnCache, slot: Memslot, gfn: int
                     ) -> KGen[int]:
    """``hva_to_pfn_retry()`` (``gpc_to_pfn_retry()`` with Firecracker 0041): resolve, map,
    retry while an invalidation raced, then drop the page reference."""
    gpc.valid = False
    new_pfn, new_vmap = -1, False
    while True:
        while kvm.mmu_invalidate_in_progress:
            yield (WAIT, ("mmu_invalidate", kvm.id))
        mmu_seq = kvm.mmu_invalidate_seq
        pfn = yield from m.design.gpc_to_pfn(m, kvm, slot, gfn, gpc.uhva)
        if pfn < 0:
            return -EFAULT
        if pfn == gpc.pfn:
            new_vmap = gpc.vmap  # new_khva = old_khva
        else:
            new_vmap = yield from m.design.gpc_map(m, pfn)
        new_pfn = pfn
        yield from folio_put(m, pfn)  # kvm_release_page_clean(): invalidation keeps it honest
        if not kvm.mmu_invalidate_in_progress and kvm.mmu_invalidate_seq == mmu_seq:
            break
        if new_pfn != gpc.pfn:  # the previous attempt's mapping
            yield from m.design.gpc_unmap(m, new_pfn, new_vmap)
    gpc.valid, gpc.pfn, gpc.vmap = True, new_pfn, new_vmap
    return 0


def kvm_setup_guest_pvclock(m: Machine, vcpu: Vcpu, gpc: GfnToPfnCache) -> KGen[None]:
    """``kvm_setup_guest_pvclock()`` (offset 0): refresh until valid or give up silently; then
    write the pvclock through ``gpc->khva`` (odd version, fields, even version)."""
    if not gpc.active:  # kvm_guest_time_update(): if (vcpu->pv_time.active)
        return
    while not kvm_gpc_check(vcpu.kvm, gpc):
        r = yield from __kvm_gpc_refresh(m, vcpu, gpc, gpc.gpa)
        if r:
            gpc.refresh_err = r
            return
    pfn, off = gpc.pfn, gpc.gpa & (PAGE_SIZE - 1)
    if gpc.vmap:
        yield ("vmap", pfn)  # through the vmap alias: the direct map is not touched
        m.trace.emit("kvm_setup_guest_pvclock", "kernel_write", pfn, {"via": "vmap"})
    else:
        yield from kernel_access(m, pfn, "kvm_setup_guest_pvclock", write=True)
    version = int.from_bytes(m.mem.read(pfn, off, 4), "little")
    version = (((version + 1) | 1) + 1) & 0xFFFFFFFF
    m.mem.write(pfn, off, version.to_bytes(4, "little") + bytes(PVCLOCK_SIZE - 4), secret=False)
    m.trace.emit("kvm_setup_guest_pvclock", "pvclock_write", pfn,
                 {"gpa": gpc.gpa, "version": version})


def kvm_gpc_deactivate(m: Machine, gpc: GfnToPfnCache) -> KGen[None]:
    """``kvm_gpc_deactivate()`` (``kvmclock_reset()`` at vCPU destruction): unmap, inactive."""
    old_pfn, old_vmap = gpc.pfn, gpc.vmap
    gpc.active = gpc.valid = False
    gpc.pfn, gpc.vmap = -1, False
    if old_pfn >= 0:
        yield from m.design.gpc_unmap(m, old_pfn, old_vmap)


def gpc_in_hva_range(kvm: Kvm, lo: int, hi: int) -> bool:
    """Would ``gfn_to_pfn_cache_invalidate_start()`` over [lo, hi) change a cache?"""
    return any(v.pv_time.valid and lo <= v.pv_time.uhva < hi for v in kvm.vcpus.values())


def gpc_invalidate_hva_range_start(kvm: Kvm, lo: int, hi: int) -> None:
    """``gfn_to_pfn_cache_invalidate_start()``: caches whose ``uhva`` is in [lo, hi) become
    invalid; the kernel mapping (``khva``) stays until the next refresh or deactivation."""
    for vcpu in kvm.vcpus.values():
        gpc = vcpu.pv_time
        if gpc.valid and lo <= gpc.uhva < hi:
            gpc.valid = False
