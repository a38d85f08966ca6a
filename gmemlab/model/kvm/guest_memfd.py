"""guest_memfd (``virt/kvm/guest_memfd.c``): what every design shares.

Creation and its validation, the file operations (mmap, fallocate with
allocate and punch-hole, release, setattr), memslot binding, invalidation of
KVM mappings, ``kvm_gmem_get_folio()`` and ``__kvm_gmem_get_pfn()``.  The paths
the series changes (``kvm_gmem_fault_user_mapping``, ``kvm_gmem_get_pfn``,
``kvm_gmem_free_folio`` and the zap/restore helpers) belong to a design
(``gmemlab.model.designs``), so each version runs its own code.

Structure follows the kernel: the *inode* holds the memory and the creation
flags (``GMEM_I(inode)->flags``); each *file* is one VM's view of it (``struct
gmem_file``: the VM and its memslot bindings), listed on the mapping's
``i_private_list``.  Memory lives as long as the inode, not the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from errno import EBADF, EFAULT, EINTR, EINVAL, EIO, ENODEV, ENOMEM, EOPNOTSUPP
from typing import TYPE_CHECKING

from gmemlab.model.fs import S_IFREG, File, Inode, file_init_mode, fput
from gmemlab.model.kvm.pfncache import gpc_invalidate_hva_range_start
from gmemlab.model.kvm.sev import sev_gmem_invalidate, sev_gmem_post_populate, sev_gmem_prepare
from gmemlab.model.mm.filemap import (
    FGP_ACCESSED,
    FGP_CREAT,
    FGP_LOCK,
    AddressSpace,
    filemap_add_folio,
    filemap_get_folio,
    mapping_set_inaccessible,
    mapping_set_no_direct_map,
)
from gmemlab.model.mm.folio import folio_mark_uptodate, folio_put, folio_unlock
from gmemlab.model.mm.locks import (
    down_read,
    down_write,
    mutex_lock,
    mutex_unlock,
    up_read,
    up_write,
)
from gmemlab.model.mm.memmap import KIND_FILE, PG_hwpoison
from gmemlab.model.mm.memory import VM_MAYSHARE, VM_SHARED, Vma
from gmemlab.model.mm.page_alloc import GFP_HIGHUSER, alloc_block
from gmemlab.model.mm.truncate import truncate_inode_pages_range
from gmemlab.model.task import KGen
from gmemlab.uapi import (
    EHWPOISON,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_X86_SNP_VM,
    PAGE_SHIFT,
    PAGE_SIZE,
    PAGES_PER_PMD,
)

if TYPE_CHECKING:
    from gmemlab.model.kvm.kvm_main import Kvm, Memslot
    from gmemlab.model.machine import Machine



@dataclass(eq=False, slots=True)
class Binding:
    start: int  # first file page index
    end: int  # one past the last
    slot: Memslot


@dataclass(eq=False, slots=True)
class GmemFile:
    """``struct gmem_file``: one VM's view of a guest_memfd inode."""

    kvm: Kvm
    bindings: list[Binding] = field(default_factory=list)

    def load(self, index: int) -> Memslot | None:
        """``xa_load(&f->bindings, index)``."""
        for b in self.bindings:
            if b.start <= index < b.end:
                return b.slot
        return None

    def overlaps(self, start: int, end: int) -> bool:
        return any(b.start < end and start < b.end for b in self.bindings)

    def in_range(self, start: int, end: int) -> list[Binding]:
        """``xa_for_each_range(&f->bindings, ..., start, end - 1)``."""
        return [b for b in self.bindings if b.start < end and start < b.end]


def gmem_flags(inode: Inode) -> int:
    return inode.private


def kvm_gmem_no_direct_map(inode: Inode) -> bool:
    return bool(inode.private & GUEST_MEMFD_FLAG_NO_DIRECT_MAP)


def folio_inode(m: Machine, pfn: int) -> Inode:
    """``folio_inode()``: ``folio->mapping->host`` (only valid while in the page cache)."""
    host = m.mappings[m.mem.mapping[pfn]].host
    assert host is not None
    return host


GMEM_DEV = 2  # kvm_gmem_mnt's anonymous device (our choice of number)


class KvmGmemFops:
    """``kvm_gmem_fops``: mmap, release, fallocate; no read/write/llseek (so VFS answers)."""

    name = "kvm_gmem_fops"
    has_read = False
    has_write = False
    has_llseek = False
    has_fsync = False
    has_splice_read = False
    has_splice_write = False

    def mmap(self, m: Machine, file: File, vma: Vma) -> KGen[int]:
        """``kvm_gmem_mmap()``."""
        yield ("file", id(file))
        if not file.inode.private & GUEST_MEMFD_FLAG_MMAP:
            return -ENODEV
        if vma.flags & (VM_SHARED | VM_MAYSHARE) != VM_SHARED | VM_MAYSHARE:
            return -EINVAL
        vma.fault = m.design.kvm_gmem_fault_user_mapping
        return 0

    def release(self, m: Machine, file: File) -> KGen[None]:
        yield from kvm_gmem_release(m, file)

    def fallocate(self, m: Machine, file: File, mode: int, offset: int, length: int) -> KGen[int]:
        return (yield from kvm_gmem_fallocate(m, file, mode, offset, length))

    def setattr_size(self, m: Machine, file: File, size: int) -> KGen[int]:
        """``kvm_gmem_setattr()``: the size of a guest_memfd never changes."""
        yield ("file", id(file))
        return -EINVAL

    def setattr_mode(self, m: Machine, file: File, mode: int) -> KGen[int]:
        """``kvm_gmem_setattr()`` refuses every attribute, the mode too (fchmod)."""
        yield ("file", id(file))
        return -EINVAL


class KvmGmemAops:
    """``kvm_gmem_aops``: ``->free_folio`` is the design's; migration is refused."""

    def free_folio(self, m: Machine, pfn: int) -> KGen[None]:
        return m.design.kvm_gmem_free_folio(m, pfn)

    def error_remove_folio(self, m: Machine, mapping: AddressSpace, pfn: int) -> KGen[int]:
        return (yield from kvm_gmem_error_folio(m, mapping, pfn))


# BIT(0) of folio->private: the folio is out of the direct map (v12 10/16).
KVM_GMEM_FOLIO_NO_DIRECT_MAP = 1 << 0
GMEM_FOPS = KvmGmemFops()
GMEM_AOPS = KvmGmemAops()


# --- creation ------------------------------------------------------------------------------------
def kvm_gmem_create(m: Machine, kvm: Kvm, size: int, flags: int) -> KGen[int]:
    """``KVM_CREATE_GUEST_MEMFD`` -> ``kvm_gmem_create()``: returns the new fd or -errno."""
    yield ("kvm", kvm.id)
    if not m.profile.has_guest_memfd:
        return -m.profile.unknown_vm_ioctl_errno  # no case for it: kvm_arch_vm_ioctl()
    supported = m.design.kvm_gmem_get_supported_flags(m, kvm.vm_type)
    if flags & ~supported:
        return -EINVAL
    if size >= 1 << 63:
        size -= 1 << 64  # args->size is a __u64 read into a loff_t
    if size <= 0 or size % PAGE_SIZE:
        return -EINVAL
    return (yield from __kvm_gmem_create(m, kvm, size, flags))


def __kvm_gmem_create(m: Machine, kvm: Kvm, size: int, flags: int) -> KGen[int]:
    mapping = m.new_mapping(GMEM_AOPS, GFP_HIGHUSER, "guest_memfd")
    inode = m.new_inode(0o600 | S_IFREG, size, mapping, "guest_memfd")
    # kvm_gmem_fs is SB_I_NOEXEC | SB_I_NODEV (kvm_gmem_init_fs_context(), 6.18).
    inode.noexec, inode.dev, inode.name = True, GMEM_DEV, "[kvm-gmem]"
    mapping_set_inaccessible(mapping)
    if m.design.series and flags & GUEST_MEMFD_FLAG_NO_DIRECT_MAP:
        mapping_set_no_direct_map(mapping)
    inode.private = flags
    file = File(GMEM_FOPS, inode, file_init_mode(GMEM_FOPS, True, True))
    inode.i_count += 1
    f = GmemFile(kvm)
    file.private_data = f
    kvm.get()
    mapping.private_list.append(f)
    fd = kvm.owner.fds.install(file)
    yield ("fd", fd)
    m.trace.emit("__kvm_gmem_create", "gmem_create", -1,
                 {"fd": fd, "size": size, "flags": flags, "ino": inode.ino})
    return fd


# --- folio lookup -----------------------------------------------------------------------------------
def kvm_gmem_get_folio(m: Machine, inode: Inode, index: int) -> KGen[int]:
    """``kvm_gmem_get_folio()``: a locked folio with a reference, created if absent."""
    return (yield from filemap_get_folio(m, inode.mapping, index,
                                         FGP_LOCK | FGP_ACCESSED | FGP_CREAT))


def kvm_gmem_huge_index(mapping: AddressSpace, index: int) -> int:
    """The first index of the 2 MiB of the file around ``index`` if one PMD-order folio may
    back it, else -1.

    ``kvm_gmem_get_huge_folio()``'s tests in Sean Christopherson's
    ``KVM_GUEST_MEMFD_ALLOW_HUGEPAGE`` patch (``20231027182217.3615211-18-seanjc@google.com``,
    dropped before guest_memfd was merged): the huge page must end inside ``i_size``, and
    none of it may be in the page cache yet (``filemap_range_has_page()``).
    """
    first = index - index % PAGES_PER_PMD
    host = mapping.host
    if (host is None or (first + PAGES_PER_PMD) << PAGE_SHIFT > host.size
            or mapping.i_pages.first(first, first + PAGES_PER_PMD) >= 0):
        return -1
    return first


def kvm_gmem_get_huge_folio(m: Machine, mapping: AddressSpace, index: int) -> KGen[int]:
    """``kvm_gmem_get_huge_folio()`` (the patch of :func:`kvm_gmem_huge_index`): a PMD-order
    folio, ``filemap_alloc_folio(gfp | __GFP_NOWARN, HPAGE_PMD_ORDER)``, put in the page
    cache at the huge index; the page for ``index``, or -ENOMEM (the caller falls back to
    order 0, as the patch does).

    The model's page cache has an entry per index: the other 511 pages are inserted here
    and the caller inserts the page it returns (a page whose index another CPU filled
    meanwhile is freed; the kernel's multi-index insertion would fail whole: our choice).
    """
    first = kvm_gmem_huge_index(mapping, index)
    if first < 0:
        return -ENOMEM
    fn = "kvm_gmem_get_huge_folio"
    base = yield from alloc_block(m, KIND_FILE, fn, large=True)
    if base < 0:
        return base
    mine = base + index - first
    for k in range(PAGES_PER_PMD):
        pfn = base + k
        if pfn != mine:
            if not (yield from filemap_add_folio(m, mapping, pfn, first + k)):
                yield from folio_unlock(m, pfn)
            yield from folio_put(m, pfn)  # the allocation's reference (the last, if it lost)
    return mine


def kvm_gmem_get_file(m: Machine, slot: Memslot) -> KGen[File | None]:
    """``get_file_active(&slot->gmem.file)``: None once the last reference is gone."""
    file = slot.gmem_file
    yield ("slot", id(slot))
    if file is None or file.f_count == 0:
        return None
    file.f_count += 1
    return file


def __kvm_gmem_get_pfn(m: Machine, file: File, slot: Memslot, index: int) -> KGen[int]:
    """``__kvm_gmem_get_pfn()``: a locked folio, or -errno."""
    yield ("slot", id(slot))
    if slot.gmem_file is not file:
        return -EFAULT
    f: GmemFile = file.private_data
    if f.load(index) is not slot:
        return -EIO
    folio = yield from kvm_gmem_get_folio(m, file.inode, index)
    if folio < 0:
        return folio
    if m.mem.flags[folio] & PG_hwpoison:
        yield from folio_unlock(m, folio)
        yield from folio_put(m, folio)
        return -EHWPOISON
    return folio


# --- arch hooks -------------------------------------------------------------------------------------
def kvm_arch_gmem_prepare(m: Machine, kvm: Kvm, gfn: int, pfn: int) -> KGen[int]:
    """``kvm_arch_gmem_prepare()`` -> ``kvm_x86_ops.gmem_prepare``: SNP's ``sev_gmem_prepare()``
    (RMP-assign the page); no other VM type sets the hook."""
    yield ("folio", pfn)
    if m.inv.enabled:
        m.inv.on_arch_prepare(pfn)
    r = sev_gmem_prepare(m, kvm, pfn)
    m.trace.emit("kvm_arch_gmem_prepare", "prepare", pfn,
                 {"gfn": gfn, "rmp": bool(m.mem.guest_owned[pfn])})
    return r


def kvm_arch_gmem_invalidate(m: Machine, pfn: int) -> KGen[None]:
    """``kvm_arch_gmem_invalidate()`` from ``kvm_gmem_free_folio()``: SNP's
    ``sev_gmem_invalidate()`` (reclaim an RMP-assigned page and clflush it through the
    direct map); nothing for a page the RMP does not assign, and elsewhere."""
    yield ("folio", pfn)
    reclaimed = yield from sev_gmem_invalidate(m, pfn)
    m.mem.invalidated[pfn] = 1
    m.trace.emit("kvm_arch_gmem_invalidate", "invalidate", pfn, {"rmp_reclaim": reclaimed})


def kvm_gmem_populate(m: Machine, kvm: Kvm, gfn: int, src: bytes) -> KGen[int]:
    """``kvm_gmem_populate()`` with SNP's callback (``KVM_SEV_SNP_LAUNCH_UPDATE``), one page.

    ``virt/kvm/guest_memfd.c`` (kvm/next): under the invalidate lock,
    ``__kvm_gmem_get_pfn()`` (no zap: v12 zaps in ``kvm_gmem_get_pfn()`` and the user
    fault only), the gfn must be private, then ``sev_gmem_post_populate()`` copies
    ``src`` in and assigns the page; on success the folio is marked uptodate.
    Returns 0 or -errno.
    """
    slot = kvm.gfn_to_memslot(gfn)
    if slot is None or not slot.has_gmem() or kvm.vm_type != KVM_X86_SNP_VM:
        return -EINVAL
    file = yield from kvm_gmem_get_file(m, slot)
    if file is None:
        return -EFAULT
    mapping = file.inode.mapping
    yield from down_write(m, mapping.invalidate_lock)
    folio = yield from __kvm_gmem_get_pfn(m, file, slot, gfn - slot.base_gfn + slot.gmem_pgoff)
    r = folio if folio < 0 else 0
    if folio >= 0:
        yield from folio_unlock(m, folio)
        r = -EINVAL
        if kvm.mem_is_private(gfn):
            r = yield from sev_gmem_post_populate(m, kvm, gfn, folio, src)
        if not r:
            yield from folio_mark_uptodate(m, folio)
        yield from folio_put(m, folio)
    yield from up_write(m, mapping.invalidate_lock)
    yield from fput(m, file)
    return r


# --- invalidation of KVM mappings -------------------------------------------------------------------
def kvm_gmem_invalidate_begin(m: Machine, inode: Inode, start: int, end: int) -> KGen[None]:
    for f in list(inode.mapping.private_list):
        yield from __kvm_gmem_invalidate_begin(m, f, start, end)


def __kvm_gmem_invalidate_begin(m: Machine, f: GmemFile, start: int, end: int) -> KGen[None]:
    """``__kvm_gmem_invalidate_begin()``: zap the stage-2 entries of every binding in range.

    With Firecracker's 0046 (a design's ``pfncache_gmem``) the vCPUs'
    pfncaches over those gfns are invalidated first, by hva (``gfn_to_hva_memslot()``).
    """
    kvm = f.kvm
    bindings = f.in_range(start, end)
    if not bindings:
        return
    if m.design.pfncache_gmem:
        for b in bindings:
            slot = b.slot
            lo = max(slot.gmem_pgoff, start) - slot.gmem_pgoff
            hi = min(slot.gmem_pgoff + slot.npages, end) - slot.gmem_pgoff
            gpc_invalidate_hva_range_start(kvm, slot.userspace_addr + (lo << PAGE_SHIFT),
                                           slot.userspace_addr + (hi << PAGE_SHIFT))
    yield from kvm.mmu_lock(m)
    kvm.mmu_invalidate_begin()
    flush = False
    for b in bindings:
        slot = b.slot
        gstart = slot.base_gfn + max(slot.gmem_pgoff, start) - slot.gmem_pgoff
        gend = slot.base_gfn + min(slot.gmem_pgoff + slot.npages, end) - slot.gmem_pgoff
        kvm.mmu_invalidate_range_add(gstart, gend)
        flush |= (yield from kvm.unmap_gfn_range(m, gstart, gend, "kvm_gmem_invalidate_begin")) > 0
    if flush:
        kvm.flush_remote_tlbs(m)
    yield from kvm.mmu_unlock(m)


def kvm_gmem_invalidate_end(m: Machine, inode: Inode, start: int, end: int) -> KGen[None]:
    for f in list(inode.mapping.private_list):
        yield from __kvm_gmem_invalidate_end(m, f, start, end)


def __kvm_gmem_invalidate_end(m: Machine, f: GmemFile, start: int, end: int) -> KGen[None]:
    if f.in_range(start, end):
        kvm = f.kvm
        yield from kvm.mmu_lock(m)
        kvm.mmu_invalidate_end()
        yield from kvm.mmu_unlock(m)


# --- fallocate ---------------------------------------------------------------------------------------
def kvm_gmem_fallocate(m: Machine, file: File, mode: int, offset: int, length: int) -> KGen[int]:
    """``kvm_gmem_fallocate()``."""
    yield ("file", id(file))
    if not mode & FALLOC_FL_KEEP_SIZE:
        return -EOPNOTSUPP
    if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
        return -EOPNOTSUPP
    if offset % PAGE_SIZE or length % PAGE_SIZE:
        return -EINVAL
    if mode & FALLOC_FL_PUNCH_HOLE:
        return (yield from kvm_gmem_punch_hole(m, file.inode, offset, length))
    return (yield from m.design.kvm_gmem_allocate(m, file.inode, offset, length))


def kvm_gmem_punch_hole(m: Machine, inode: Inode, offset: int, length: int) -> KGen[int]:
    """``kvm_gmem_punch_hole()``: invalidate KVM mappings, truncate, end the invalidation."""
    start = offset >> PAGE_SHIFT
    end = (offset + length) >> PAGE_SHIFT
    mapping = inode.mapping
    yield from down_write(m, mapping.invalidate_lock)
    m.trace.emit("kvm_gmem_punch_hole", "punch_hole", -1, {"start": start, "end": end})
    yield from kvm_gmem_invalidate_begin(m, inode, start, end)
    yield from truncate_inode_pages_range(m, mapping, start, end)
    yield from kvm_gmem_invalidate_end(m, inode, start, end)
    yield from up_write(m, mapping.invalidate_lock)
    return 0


def kvm_gmem_allocate(m: Machine, inode: Inode, offset: int, length: int) -> KGen[int]:
    """``kvm_gmem_allocate()``: create folios (not zeroed, not zapped) under the shared lock."""
    if offset + length > inode.size:
        return -EINVAL
    mapping = inode.mapping
    yield from down_read(m, mapping.invalidate_lock)
    start, end = offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT
    batched = m.ranges.allocate(m, inode, start, end, lambda index: kvm_gmem_allocate_one(m, inode, index))
    if batched is None:
        r = 0
        for index in range(start, end):
            r = yield from kvm_gmem_allocate_one(m, inode, index)
            if r:
                break
    else:
        r = batched
    yield from up_read(m, mapping.invalidate_lock)
    return r


def kvm_gmem_allocate_one(m: Machine, inode: Inode, index: int) -> KGen[int]:
    """One index of :func:`kvm_gmem_allocate`'s loop: 0 or -errno."""
    if m.faults.should_fail("signal_pending"):
        return -EINTR
    folio = yield from kvm_gmem_get_folio(m, inode, index)
    if folio < 0:
        return folio
    yield from folio_unlock(m, folio)
    yield from folio_put(m, folio)
    return 0


# --- memslot binding --------------------------------------------------------------------------------
def kvm_gmem_bind(m: Machine, kvm: Kvm, slot: Memslot, fd: int, offset: int) -> KGen[int]:
    """``kvm_gmem_bind()``."""
    size = slot.npages << PAGE_SHIFT
    file = kvm.owner.fds.get(fd)
    yield ("fd", fd)
    if file is None:
        return -EBADF
    if file.f_op is not GMEM_FOPS:
        return -EINVAL
    f: GmemFile = file.private_data
    if f.kvm is not kvm:
        return -EINVAL
    inode = file.inode
    if offset < 0 or offset % PAGE_SIZE or offset + size > inode.size:
        return -EINVAL
    mapping = inode.mapping
    yield from down_write(m, mapping.invalidate_lock)
    start = offset >> PAGE_SHIFT
    end = start + slot.npages
    if f.overlaps(start, end):
        yield from up_write(m, mapping.invalidate_lock)
        return -EINVAL
    slot.gmem_file = file
    slot.gmem_pgoff = start
    if inode.private & GUEST_MEMFD_FLAG_MMAP:
        slot.gmem_only = True
    f.bindings.append(Binding(start, end, slot))
    yield from up_write(m, mapping.invalidate_lock)
    m.trace.emit("kvm_gmem_bind", "bind", -1, {"slot": slot.id, "pgoff": start, "npages": slot.npages})
    return 0


def kvm_gmem_unbind(m: Machine, slot: Memslot) -> KGen[None]:
    """``kvm_gmem_unbind()``: drop the binding unless release already did."""
    file = slot.gmem_file
    if file is None:
        return
    f: GmemFile = file.private_data
    mapping = file.inode.mapping
    yield from down_write(m, mapping.invalidate_lock)
    f.bindings = [b for b in f.bindings if b.slot is not slot]
    slot.gmem_file = None
    yield from up_write(m, mapping.invalidate_lock)


def kvm_gmem_release(m: Machine, file: File) -> KGen[None]:
    """``kvm_gmem_release()``: orphan the bindings and zap their SPTEs; memory stays with the inode."""
    f: GmemFile = file.private_data
    kvm = f.kvm
    inode = file.inode
    yield from mutex_lock(m, kvm.slots_lock)
    yield from down_write(m, inode.mapping.invalidate_lock)
    for b in f.bindings:
        b.slot.gmem_file = None
    m.trace.emit("kvm_gmem_release", "gmem_release", -1, {"ino": inode.ino})
    yield from __kvm_gmem_invalidate_begin(m, f, 0, 1 << 62)
    yield from __kvm_gmem_invalidate_end(m, f, 0, 1 << 62)
    inode.mapping.private_list.remove(f)
    yield from up_write(m, inode.mapping.invalidate_lock)
    yield from mutex_unlock(m, kvm.slots_lock)
    f.bindings.clear()
    yield from kvm.put(m)


def kvm_gmem_error_folio(m: Machine, mapping: AddressSpace, pfn: int) -> KGen[int]:
    """``kvm_gmem_error_folio()``: invalidate KVM mappings, but leave the folio (MF_DELAYED)."""
    inode = mapping.host
    assert inode is not None
    yield from down_read(m, mapping.invalidate_lock)
    start = m.mem.index[pfn]
    yield from kvm_gmem_invalidate_begin(m, inode, start, start + 1)
    yield from kvm_gmem_invalidate_end(m, inode, start, start + 1)
    yield from up_read(m, mapping.invalidate_lock)
    return 0


def kvm_gmem_get_index(slot: Memslot, gfn: int) -> int:
    return gfn - slot.base_gfn + slot.gmem_pgoff


def kvm_gmem_link(m: Machine, kvm: Kvm, file: File) -> KGen[int]:
    """Give ``kvm`` its own file on an existing guest_memfd inode (model extension).

    The kernel's structures allow several files (one per VM) on one inode, each
    with its own bindings (``gmem_file_list``); there is no v12 uAPI that creates
    one.  The checker uses this to put two VMs on one inode.
    """
    inode = file.inode
    new = File(GMEM_FOPS, inode, file.f_mode)
    inode.i_count += 1
    f = GmemFile(kvm)
    new.private_data = f
    kvm.get()
    inode.mapping.private_list.append(f)
    fd = kvm.owner.fds.install(new)
    yield ("fd", fd)
    return fd
