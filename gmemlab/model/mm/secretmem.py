"""memfd_secret (``mm/secretmem.c``): the reference user of the same primitives.

``memfd_secret(flags)``: ``-EINVAL`` for unknown flags, ``-ENOSYS`` when disabled
or when ``can_set_direct_map()`` is false.  The size can be set once
(``ftruncate`` on a sized file is ``-EINVAL``); mmap must be shared and gets
``VM_LOCKED|VM_DONTDUMP``.  The fault removes a zeroed folio from the direct
map *before* it enters the page cache, and ``->free_folio`` restores it, then
zeroes it.  The fault and free paths are the design's: secretmem moved onto
``folio_{zap,restore}_direct_map()`` in v11, and the series sets
``AS_NO_DIRECT_MAP`` on its mapping so GUP refuses it by that flag.
"""

from __future__ import annotations

from errno import EINVAL, ENOSYS
from typing import TYPE_CHECKING

from gmemlab.model.fs import S_IFREG, File, file_init_mode
from gmemlab.model.mm.filemap import AS_UNEVICTABLE, mapping_set_no_direct_map
from gmemlab.model.mm.memory import VM_DONTDUMP, VM_LOCKED, VM_MAYSHARE, VM_SHARED, Process, Vma
from gmemlab.model.mm.page_alloc import GFP_HIGHUSER
from gmemlab.model.task import KGen
from gmemlab.uapi import O_CLOEXEC

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine



class SecretmemFops:
    name = "secretmem_fops"
    has_read = False
    has_write = False
    has_llseek = False
    has_fsync = False
    has_splice_read = False
    has_splice_write = False

    def mmap(self, m: Machine, file: File, vma: Vma) -> KGen[int]:
        """``secretmem_mmap()``."""
        yield ("file", id(file))
        if not vma.flags & (VM_SHARED | VM_MAYSHARE):
            return -EINVAL
        vma.flags |= VM_LOCKED | VM_DONTDUMP
        vma.fault = m.design.secretmem_fault
        return 0

    def release(self, m: Machine, file: File) -> KGen[None]:
        yield ("file", id(file))

    def fallocate(self, m: Machine, file: File, mode: int, offset: int, length: int) -> KGen[int]:
        yield ("file", id(file))
        return -95  # -EOPNOTSUPP: no ->fallocate

    def setattr_size(self, m: Machine, file: File, size: int) -> KGen[int]:
        """``secretmem_setattr()``: the size can only be set while it is zero."""
        yield ("file", id(file))
        if file.inode.size:
            return -EINVAL
        file.inode.size = size
        return 0

    def setattr_mode(self, m: Machine, file: File, mode: int) -> KGen[int]:
        """``secretmem_setattr()`` -> ``simple_setattr()``: only a size change is refused."""
        yield ("file", id(file))
        file.inode.mode = file.inode.mode & ~0o7777 | mode
        return 0


class SecretmemAops:
    def free_folio(self, m: Machine, pfn: int) -> KGen[None]:
        return m.design.secretmem_free_folio(m, pfn)


SECRETMEM_FOPS = SecretmemFops()
SECRETMEM_DEV = 3  # secretmem_mnt's anonymous device (our choice of number)
SECRETMEM_AOPS = SecretmemAops()


def sys_memfd_secret(m: Machine, proc: Process, flags: int) -> KGen[int]:
    """``SYSCALL_DEFINE1(memfd_secret)``: ENOSYS when secretmem is off or the direct map cannot
    be changed, *then* EINVAL for unknown flags (mm/secretmem.c, as in 6.18 and v12)."""
    yield ("fd", None)
    if not m.profile.secretmem_enable or not m.profile.can_set_direct_map:
        return -ENOSYS
    if flags & ~O_CLOEXEC:
        return -EINVAL
    mapping = m.new_mapping(SECRETMEM_AOPS, GFP_HIGHUSER, "secretmem")
    mapping.set(AS_UNEVICTABLE)
    if m.design.secretmem_sets_no_direct_map:
        mapping_set_no_direct_map(mapping)
    inode = m.new_inode(0o600 | S_IFREG, 0, mapping, "secretmem")
    # secretmem_mnt is noexec (measured on 6.18.44: PROT_EXEC is EPERM, VmFlags lacks "me").
    inode.dev, inode.name, inode.noexec = SECRETMEM_DEV, "secretmem", True
    file = File(SECRETMEM_FOPS, inode, file_init_mode(SECRETMEM_FOPS, True, True))
    inode.i_count += 1
    fd = proc.fds.install(file, cloexec=bool(flags & O_CLOEXEC))
    m.trace.emit("memfd_secret", "secretmem_create", -1, {"fd": fd})
    return fd
