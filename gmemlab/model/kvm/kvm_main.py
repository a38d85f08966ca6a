"""KVM VMs and memslots (``virt/kvm/kvm_main.c``), with the stage-2 state they own.

A :class:`Kvm` is ``struct kvm``: its type, its memslots, its stage-2 table
(gfn -> pfn), the ``mmu_invalidate_seq``/``_in_progress`` protocol that makes a
guest fault racing an invalidation retry, and its references (the VM fd,
vCPUs and guest_memfd files pin it).  ``KVM_SET_USER_MEMORY_REGION2`` follows
``kvm_set_memory_region()`` check for check, so the errno is the kernel's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from errno import EEXIST, EFAULT, EINVAL, EIO, ENOMEM, ENOTTY
from typing import TYPE_CHECKING

from gmemlab.model.fs import File
from gmemlab.model.kvm.guest_memfd import kvm_gmem_bind, kvm_gmem_unbind
from gmemlab.model.kvm.pfncache import gpc_invalidate_hva_range_start, kvm_gpc_deactivate
from gmemlab.model.kvm.tdx import is_td, tdx_sept_remove_private_spte
from gmemlab.model.mm.locks import mutex_lock, mutex_unlock, spin_lock, spin_unlock
from gmemlab.model.mm.memmap import GUEST_OWNED_TDX
from gmemlab.model.mm.memory import Process, walk_user
from gmemlab.model.mm.xarray import XArray
from gmemlab.model.task import KGen
from gmemlab.uapi import (
    KVM_CAP_BINARY_STATS_FD,
    KVM_CAP_GUEST_MEMFD,
    KVM_CAP_GUEST_MEMFD_FLAGS,
    KVM_CAP_MAX_VCPUS,
    KVM_CAP_MEMORY_ATTRIBUTES,
    KVM_CAP_MEMORY_FAULT_INFO,
    KVM_CAP_NR_MEMSLOTS,
    KVM_CAP_NR_VCPUS,
    KVM_CAP_READONLY_MEM,
    KVM_CAP_USER_MEMORY2,
    KVM_CAP_VM_TYPES,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    PAGE_SHIFT,
    PAGE_SIZE,
    to_u64,
)

if TYPE_CHECKING:
    from gmemlab.model.kvm.vcpu import Vcpu
    from gmemlab.model.machine import Machine

TASK_SIZE_MAX = 0x7FFF_FFFF_F000
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1


@dataclass(eq=False, slots=True)
class Memslot:
    id: int
    base_gfn: int
    npages: int
    flags: int
    userspace_addr: int
    gmem_file: File | None = None
    gmem_pgoff: int = 0
    gmem_only: bool = False  # KVM_MEMSLOT_GMEM_ONLY: every fault is served by guest_memfd

    def has_gmem(self) -> bool:
        return bool(self.flags & KVM_MEM_GUEST_MEMFD)

    def contains(self, gfn: int) -> bool:
        return self.base_gfn <= gfn < self.base_gfn + self.npages


@dataclass(eq=False)
class Kvm:
    """``struct kvm``."""

    id: int
    vm_type: int
    owner: Process
    users: int = 1
    memslots: dict[int, Memslot] = field(default_factory=dict)
    spte: XArray = field(default_factory=XArray)  # stage-2: gfn -> pfn
    mmu_invalidate_seq: int = 0
    mmu_invalidate_in_progress: int = 0
    mmu_invalidate_range: tuple[int, int] = (-1, -1)
    attributes: dict[int, int] = field(default_factory=dict)  # gfn -> KVM_MEMORY_ATTRIBUTE_*
    vcpus: dict[int, Vcpu] = field(default_factory=dict)
    destroyed: bool = False
    tlb_flushes: int = 0

    @property
    def slots_lock(self) -> tuple[str, int]:
        return ("slots_lock", self.id)

    # --- references --------------------------------------------------------------------
    def get(self) -> None:
        """``kvm_get_kvm()``."""
        self.users += 1

    def put(self, m: Machine) -> KGen[None]:
        """``kvm_put_kvm()``: the last reference destroys the VM."""
        yield ("kvm", self.id)
        self.users -= 1
        if self.users == 0:
            yield from kvm_destroy_vm(m, self)

    # --- mmu_lock and the invalidation protocol ----------------------------------------
    def mmu_lock(self, m: Machine) -> KGen[None]:
        yield from spin_lock(m, ("mmu_lock", self.id))

    def mmu_unlock(self, m: Machine) -> KGen[None]:
        yield from spin_unlock(m, ("mmu_lock", self.id))

    def mmu_invalidate_begin(self) -> None:
        """``kvm_mmu_invalidate_begin()`` (under mmu_lock)."""
        self.mmu_invalidate_in_progress += 1
        if self.mmu_invalidate_in_progress == 1:
            self.mmu_invalidate_range = (-1, -1)

    def mmu_invalidate_range_add(self, start: int, end: int) -> None:
        lo, hi = self.mmu_invalidate_range
        self.mmu_invalidate_range = (start, end) if lo < 0 else (min(lo, start), max(hi, end))

    def mmu_invalidate_end(self) -> None:
        """``kvm_mmu_invalidate_end()``: bump the sequence so in-flight faults retry."""
        self.mmu_invalidate_seq += 1
        self.mmu_invalidate_in_progress -= 1

    def mmu_invalidate_retry_gfn(self, mmu_seq: int, gfn: int) -> bool:
        """``mmu_invalidate_retry_gfn()``: must a fault that sampled ``mmu_seq`` retry?"""
        if self.mmu_invalidate_in_progress:
            lo, hi = self.mmu_invalidate_range
            if lo <= gfn < hi:
                return True
        return self.mmu_invalidate_seq != mmu_seq

    def unmap_gfn_range(self, m: Machine, start: int, end: int, fn: str) -> KGen[int]:
        """``kvm_mmu_unmap_gfn_range()``: zap the stage-2 entries of [start, end)."""
        batched = m.ranges.unmap_gfn_range(m, self, start, end, fn)
        if batched is not None:
            return batched
        zapped = 0
        for gfn, pfn in list(self.spte.items(start, end)):
            yield ("spte", (self.id, gfn))
            self.spte.erase(gfn)
            m.mem.s2count[pfn] -= 1
            m.trace.emit(fn, "spte_zap", pfn, {"vm": self.id, "gfn": gfn})
            if m.mem.guest_owned[pfn] == GUEST_OWNED_TDX and is_td(m, self):
                # remove_external_spte(): the TDX module gives the page back
                yield from tdx_sept_remove_private_spte(m, self, gfn, pfn)
            zapped += 1
        return zapped

    def flush_remote_tlbs(self, m: Machine) -> None:
        """``kvm_flush_remote_tlbs()``: guest TLBs (not the direct map); counted only."""
        self.tlb_flushes += 1
        m.trace.count("kvm_flush_remote_tlbs")

    # --- mmu notifier (memslots backed by userspace mappings) ---------------------------
    def hva_range_gfns(self, hva_lo: int, hva_hi: int) -> list[tuple[int, int]]:
        out = []
        for slot in self.memslots.values():
            if slot.gmem_only or not slot.userspace_addr:
                continue
            s_lo = slot.userspace_addr
            s_hi = s_lo + (slot.npages << PAGE_SHIFT)
            lo, hi = max(s_lo, hva_lo), min(s_hi, hva_hi)
            if lo < hi:
                out.append((slot.base_gfn + ((lo - s_lo) >> PAGE_SHIFT),
                            slot.base_gfn + (-(-(hi - s_lo) // PAGE_SIZE))))
        return out

    def mmu_notifier_invalidate_range_start(self, m: Machine, lo: int, hi: int) -> KGen[None]:
        """``kvm_mmu_notifier_invalidate_range_start()``: pfncaches first
        (``gfn_to_pfn_cache_invalidate_start()``), then the stage-2 entries."""
        gpc_invalidate_hva_range_start(self, lo, hi)
        ranges = self.hva_range_gfns(lo, hi)
        if not ranges:
            return
        yield from self.mmu_lock(m)
        self.mmu_invalidate_begin()
        for gstart, gend in ranges:
            self.mmu_invalidate_range_add(gstart, gend)
            if (yield from self.unmap_gfn_range(m, gstart, gend, "kvm_mmu_notifier_invalidate")):
                self.flush_remote_tlbs(m)
        yield from self.mmu_unlock(m)

    def mmu_notifier_invalidate_range_end(self, m: Machine, lo: int, hi: int) -> KGen[None]:
        if not self.hva_range_gfns(lo, hi):
            return
        yield from self.mmu_lock(m)
        self.mmu_invalidate_end()
        yield from self.mmu_unlock(m)

    def gfn_to_memslot(self, gfn: int) -> Memslot | None:
        for slot in self.memslots.values():
            if slot.contains(gfn):
                return slot
        return None

    def mem_is_private(self, gfn: int) -> bool:
        """``kvm_mem_is_private()``."""
        return bool(self.attributes.get(gfn, 0) & KVM_MEMORY_ATTRIBUTE_PRIVATE)


# --- capabilities --------------------------------------------------------------------------------
def kvm_check_extension(m: Machine, kvm: Kvm | None, cap: int) -> int:
    """``kvm_vm_ioctl_check_extension_generic()`` + the arch part; ``kvm=None`` is /dev/kvm."""
    prof = m.profile
    vm_type = kvm.vm_type if kvm is not None else None
    if cap == KVM_CAP_USER_MEMORY2:
        return 1
    if cap == KVM_CAP_GUEST_MEMFD:
        return 1 if prof.has_guest_memfd else 0
    if cap == KVM_CAP_GUEST_MEMFD_FLAGS:
        if not prof.has_guest_memfd:
            return 0
        return m.design.kvm_gmem_get_supported_flags(m, vm_type)
    if cap == KVM_CAP_MEMORY_ATTRIBUTES:
        if not prof.memory_attributes:
            return 0
        if vm_type is None or prof.has_private_mem(vm_type):
            return KVM_MEMORY_ATTRIBUTE_PRIVATE
        return 0
    if cap == KVM_CAP_VM_TYPES:
        return sum(1 << t for t in prof.vm_types) if prof.arch == "x86_64" else 0
    if cap == KVM_CAP_NR_MEMSLOTS:
        return prof.nr_memslots
    if cap == KVM_CAP_NR_VCPUS:
        return prof.nr_vcpus
    if cap == KVM_CAP_MAX_VCPUS:
        return prof.max_vcpus
    if cap in (KVM_CAP_READONLY_MEM, KVM_CAP_BINARY_STATS_FD, KVM_CAP_MEMORY_FAULT_INFO):
        return 1
    return 0


def kvm_dev_ioctl_create_vm(m: Machine, proc: Process, vm_type: int) -> KGen[Kvm | int]:
    """``kvm_dev_ioctl_create_vm()``: EINVAL for a type this host does not support."""
    yield ("kvm", None)
    if vm_type not in m.profile.vm_types:
        return -EINVAL
    kvm = Kvm(m.new_vm_id(), vm_type, proc)
    m.kvms[kvm.id] = kvm
    proc.mm.notifiers.append(kvm)  # kvm_init_mmu_notifier() on current->mm
    m.trace.emit("kvm_create_vm", "vm_create", -1, {"vm": kvm.id, "type": vm_type})
    return kvm


# --- memslots ------------------------------------------------------------------------------------
def check_memory_region_flags(m: Machine, kvm: Kvm, flags: int) -> int:
    valid = KVM_MEM_LOG_DIRTY_PAGES
    if m.profile.has_guest_memfd:
        valid |= KVM_MEM_GUEST_MEMFD
    if flags & KVM_MEM_GUEST_MEMFD:
        valid &= ~KVM_MEM_LOG_DIRTY_PAGES  # dirty logging of private memory unsupported
    else:
        valid |= KVM_MEM_READONLY  # guest_memfd is incompatible with read-only slots
    return -EINVAL if flags & ~valid else 0


def kvm_set_memory_region(m: Machine, kvm: Kvm, slot_id: int, flags: int, gpa: int, size: int,
                          uaddr: int, gmem_fd: int, gmem_offset: int) -> KGen[int]:
    """``kvm_vm_ioctl_set_memory_region()`` -> ``kvm_set_memory_region()``."""
    if slot_id & 0xFFFF >= m.profile.nr_memslots:
        return -EINVAL
    yield from mutex_lock(m, kvm.slots_lock)
    r = yield from _set_memory_region_locked(m, kvm, slot_id, flags, gpa, size, uaddr, gmem_fd,
                                             gmem_offset)
    yield from mutex_unlock(m, kvm.slots_lock)
    return r


def _set_memory_region_locked(m: Machine, kvm: Kvm, slot_id: int, flags: int, gpa: int,
                              size: int, uaddr: int, gmem_fd: int, gmem_offset: int) -> KGen[int]:

    r = check_memory_region_flags(m, kvm, flags)
    if r:
        return r
    as_id, sid = slot_id >> 16, slot_id & 0xFFFF
    if size % PAGE_SIZE or size >= 1 << 64:
        return -EINVAL
    if gpa % PAGE_SIZE:
        return -EINVAL
    if uaddr % PAGE_SIZE or uaddr + size > TASK_SIZE_MAX:
        return -EINVAL
    if flags & KVM_MEM_GUEST_MEMFD and (gmem_offset % PAGE_SIZE
                                        or gmem_offset + size >= 1 << 64):
        return -EINVAL
    if as_id >= 1:
        return -EINVAL
    if gpa + size >= 1 << 64:
        return -EINVAL
    if size >> PAGE_SHIFT > KVM_MEM_MAX_NR_PAGES:
        return -EINVAL
    old = kvm.memslots.get(sid)
    if not size:
        if old is None:
            return -EINVAL
        yield from kvm_delete_memslot(m, kvm, old)
        return 0
    base_gfn, npages = gpa >> PAGE_SHIFT, size >> PAGE_SHIFT
    if old is not None:
        if flags & KVM_MEM_GUEST_MEMFD:
            return -EINVAL  # guest_memfd memslots are immutable
        if uaddr != old.userspace_addr or npages != old.npages or (
            (flags ^ old.flags) & (KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD)
        ):
            return -EINVAL
        if base_gfn == old.base_gfn and flags == old.flags:
            return 0
        # MOVE and FLAGS_ONLY: delete and re-create, as kvm_set_memslot() does.
        if base_gfn != old.base_gfn and _overlaps(kvm, sid, base_gfn, npages):
            return -EEXIST
        yield from kvm_delete_memslot(m, kvm, old)
    elif _overlaps(kvm, sid, base_gfn, npages):
        return -EEXIST
    new = Memslot(sid, base_gfn, npages, flags, uaddr)
    if flags & KVM_MEM_GUEST_MEMFD:
        r = yield from kvm_gmem_bind(m, kvm, new, gmem_fd, gmem_offset)
        if r:
            return r
    if kvm.destroyed:
        yield from kvm_gmem_unbind(m, new)
        return -EIO
    kvm.memslots[sid] = new
    m.trace.emit("kvm_set_memslot", "memslot_create", -1,
                 {"vm": kvm.id, "slot": sid, "gpa": gpa, "size": size,
                  "gmem": bool(flags & KVM_MEM_GUEST_MEMFD)})
    return 0


def _overlaps(kvm: Kvm, sid: int, base_gfn: int, npages: int) -> bool:
    """``kvm_check_memslot_overlap()``."""
    return any(s.id != sid and s.base_gfn < base_gfn + npages and base_gfn < s.base_gfn + s.npages
               for s in kvm.memslots.values())


def kvm_delete_memslot(m: Machine, kvm: Kvm, slot: Memslot) -> KGen[None]:
    """``kvm_set_memslot(KVM_MR_DELETE)``: zap its stage-2 entries, unbind guest_memfd."""

    yield from kvm.mmu_lock(m)
    kvm.mmu_invalidate_begin()
    kvm.mmu_invalidate_range_add(slot.base_gfn, slot.base_gfn + slot.npages)
    if (yield from kvm.unmap_gfn_range(m, slot.base_gfn, slot.base_gfn + slot.npages,
                                       "kvm_arch_flush_shadow_memslot")):
        kvm.flush_remote_tlbs(m)
    kvm.mmu_invalidate_end()
    yield from kvm.mmu_unlock(m)
    del kvm.memslots[slot.id]
    if slot.has_gmem():
        yield from kvm_gmem_unbind(m, slot)
    m.trace.emit("kvm_set_memslot", "memslot_delete", -1, {"vm": kvm.id, "slot": slot.id})


def kvm_set_memory_attributes(m: Machine, kvm: Kvm, address: int, size: int,
                              attributes: int, flags: int) -> KGen[int]:
    """``kvm_vm_ioctl_set_mem_attributes()``; ENOTTY where the ioctl is not built."""
    yield ("kvm", kvm.id)
    prof = m.profile
    if not prof.memory_attributes:
        return -ENOTTY
    supported = KVM_MEMORY_ATTRIBUTE_PRIVATE if prof.has_private_mem(kvm.vm_type) else 0
    if flags or attributes & ~supported:
        return -EINVAL
    if size == 0 or to_u64(address + size) < address:  # the u64 sum wraps
        return -EINVAL
    if address % PAGE_SIZE or size % PAGE_SIZE:
        return -EINVAL
    start, end = address >> PAGE_SHIFT, (address + size) >> PAGE_SHIFT
    return (yield from kvm_vm_set_mem_attributes(m, kvm, start, end, attributes))


XA_NODE_BYTES, XA_CHUNK = 576, 64  # sizeof(struct xa_node) on 64-bit; slots per node


def kvm_vm_set_mem_attributes(m: Machine, kvm: Kvm, start: int, end: int,
                              attributes: int) -> KGen[int]:
    """``kvm_vm_set_mem_attributes()`` (virt/kvm/kvm_main.c, 6.18).

    Nothing to do if the whole range already has ``attributes`` (so clearing a huge
    empty range is cheap, as in the kernel).  Otherwise every index is reserved in
    ``mem_attr_array`` first (``xa_reserve()``, GFP_KERNEL_ACCOUNT): a range whose
    xarray nodes do not fit in free memory fails there with -ENOMEM, before any
    attribute or mapping changed.  Then invalidate, store, and end the invalidation.
    """
    yield from mutex_lock(m, kvm.slots_lock)
    if _range_has_attributes(kvm, start, end, attributes):
        yield from mutex_unlock(m, kvm.slots_lock)
        return 0
    if -(-(end - start) // XA_CHUNK) * XA_NODE_BYTES > m.alloc.nr_free * PAGE_SIZE:
        yield from mutex_unlock(m, kvm.slots_lock)
        return -ENOMEM
    yield from kvm.mmu_lock(m)
    kvm.mmu_invalidate_begin()
    kvm.mmu_invalidate_range_add(start, end)
    if (yield from kvm.unmap_gfn_range(m, start, end, "kvm_vm_set_mem_attributes")):
        kvm.flush_remote_tlbs(m)
    if attributes:
        for gfn in range(start, end):
            kvm.attributes[gfn] = attributes
    else:
        for gfn in [g for g in kvm.attributes if start <= g < end]:
            del kvm.attributes[gfn]
    kvm.mmu_invalidate_end()
    yield from kvm.mmu_unlock(m)
    yield from mutex_unlock(m, kvm.slots_lock)
    return 0


def _range_has_attributes(kvm: Kvm, start: int, end: int, attributes: int) -> bool:
    """``kvm_range_has_memory_attributes(kvm, start, end, ~0, attributes)``."""
    if not attributes:
        return not any(start <= g < end for g in kvm.attributes)
    return (end - start <= len(kvm.attributes)
            and all(kvm.attributes.get(g) == attributes for g in range(start, end)))


def kvm_destroy_vm(m: Machine, kvm: Kvm) -> KGen[None]:
    """``kvm_destroy_vm()``: zap everything, free the memslots (unbinding guest_memfd),
    and take the VM off ``vm_list`` (``Machine.kvms``) so nothing keeps it alive."""
    kvm.destroyed = True
    m.trace.emit("kvm_destroy_vm", "vm_destroy", -1, {"vm": kvm.id})
    for vcpu in kvm.vcpus.values():  # kvm_arch_destroy_vm() -> kvmclock_reset()
        yield from kvm_gpc_deactivate(m, vcpu.pv_time)
    for slot in list(kvm.memslots.values()):
        yield from kvm_delete_memslot(m, kvm, slot)
    if kvm in kvm.owner.mm.notifiers:
        kvm.owner.mm.notifiers.remove(kvm)
    m.kvms.pop(kvm.id, None)


def kvm_read_guest(m: Machine, kvm: Kvm, gpa: int, length: int) -> KGen[bytes | int]:
    """``kvm_read_guest()``: ``copy_from_user()`` from the memslot's ``userspace_addr``.

    How KVM reaches guest memory for emulation, page-table walks and pvtime in
    the non-CoCo design: through the VMM's mapping, never the direct map.
    """

    out = bytearray(length)
    done = 0
    while done < length:
        g = gpa + done
        slot = kvm.gfn_to_memslot(g >> PAGE_SHIFT)
        if slot is None or not slot.userspace_addr:
            return -EFAULT
        n = min(length - done, PAGE_SIZE - (g & (PAGE_SIZE - 1)))
        hva = slot.userspace_addr + (g - (slot.base_gfn << PAGE_SHIFT))

        def op(pfn: int, poff: int, boff: int, k: int, base: int = done) -> None:
            out[base + boff : base + boff + k] = m.mem.read(pfn, poff, k)

        r = yield from walk_user(m, kvm.owner, hva, n, False, op)
        if r < 0:
            return -EFAULT
        done += n
    m.trace.emit("kvm_read_guest", "copy_from_user", -1, {"gpa": gpa, "len": length})
    return bytes(out)
