"""The twin's private guest environment: page tables, code and stack in a memslot of its own.

kvm_pvm runs guest code natively (through the KVM MMU, hence through
``kvm_gmem_get_pfn`` for guest_memfd slots) only when it is 64-bit code at
CPL3 (``/work/shared/reference/realkernel.md`` §0, §5).  Every vCPU the twin
creates therefore starts in long mode at CPL3 with an identity map of guest
physical memory.

Layout (all of it in one anonymous, ``MADV_DONTFORK`` memslot the twin owns):

* memslot number ``KVM_CAP_NR_MEMSLOTS - 1`` (32763 on the reference kernel),
  at GPA :data:`PRIVATE_GPA` = 511 GiB, :data:`PRIVATE_SIZE` = 4 MiB.  Users
  must not place memslots there (``KVM_SET_USER_MEMORY_REGION2`` answers EEXIST);
* a PML4 and a PDPT identity-mapping GPA [0, :data:`IDENTITY_LIMIT` = 512 GiB)
  with 1 GiB pages when CPUID has PDPE1GB, otherwise with 2 MiB pages through
  512 page directories (2 MiB of tables).  Every entry is user-accessible;
* :data:`MAX_PROGRAM_VCPUS` areas of :data:`AREA_SIZE` bytes, one per vCPU in
  creation order: code first, the stack at the top;
* right after the slot, a 64 KiB doorbell window at :data:`PORT_WINDOW_GPA`
  with no memslot: a store to ``PORT_WINDOW_GPA + port`` is how a program
  writes to ``port`` (see :mod:`gmemlab.twin.asm`).

Programs may not touch [:data:`PRIVATE_GPA`, :data:`RESERVED_END`).
"""

from __future__ import annotations

import array
import ctypes
import functools
from dataclasses import dataclass

from gmemlab import uapi
from gmemlab.twin.asm import Target

GIB = 1 << 30
IDENTITY_LIMIT = 512 * GIB
PRIVATE_GPA = 511 * GIB
PRIVATE_SIZE = 4 << 20
PML4_OFFSET = 0x0
PDPT_OFFSET = 0x1000
PD_OFFSET = 0x2000
AREAS_OFFSET = 0x300000
AREA_SIZE = 0x10000
STACK_SIZE = 0x1000
MAX_PROGRAM_VCPUS = (PRIVATE_SIZE - AREAS_OFFSET) // AREA_SIZE
PORT_WINDOW_GPA = PRIVATE_GPA + PRIVATE_SIZE
PORT_WINDOW_SIZE = 0x10000
RESERVED_END = PORT_WINDOW_GPA + PORT_WINDOW_SIZE

_PTE_P, _PTE_RW, _PTE_US, _PTE_PS = 0x1, 0x2, 0x4, 0x80
_TABLE = _PTE_P | _PTE_RW | _PTE_US
_LEAF = _TABLE | _PTE_PS

# Control state of the realkernel.md §5 recipe.
CR0_LONG = 0x80050033  # PG | AM | WP | NE | ET | MP | PE
CR4_PAE = 0x20
EFER_LONG = 0x500  # LMA | LME
RFLAGS_INITIAL = 0x2  # only the fixed bit: IF=0; IOPL would be forced to 0 by kvm_pvm anyway
USER_CS = 0x33
USER_DS = 0x2B
CPUID_EXT_FEATURES = 0x80000001
CPUID_EDX_PDPE1GB = 1 << 26


TARGET = Target(port_base=PORT_WINDOW_GPA, limit=IDENTITY_LIMIT, reserved=(PRIVATE_GPA, RESERVED_END))


def port_of(gpa: int) -> int | None:
    """The port a doorbell store at ``gpa`` stands for, or None outside the window."""
    offset = gpa - PORT_WINDOW_GPA
    return offset if 0 <= offset < PORT_WINDOW_SIZE else None


@dataclass(frozen=True, slots=True)
class ProgramArea:
    """Where one vCPU's code and stack live, as GPA and as host address."""

    code_gpa: int
    code_hva: int
    code_size: int
    stack_top_gpa: int


def has_1g_pages(cpuid: ctypes.Array[uapi.kvm_cpuid_entry2]) -> bool:
    return any(e.function == CPUID_EXT_FEATURES and e.edx & CPUID_EDX_PDPE1GB for e in cpuid)


@functools.cache
def page_tables(gib_pages: bool) -> bytes:
    """PML4, PDPT and (without 1 GiB pages) the page directories, as laid out above."""
    pml4 = array.array("Q", [PRIVATE_GPA + PDPT_OFFSET | _TABLE] + [0] * 511)
    if gib_pages:
        pdpt = array.array("Q", range(_LEAF, IDENTITY_LIMIT, GIB))
        return pml4.tobytes() + pdpt.tobytes()
    pd_base = PRIVATE_GPA + PD_OFFSET
    pdpt = array.array("Q", range(pd_base | _TABLE, pd_base + 512 * uapi.PAGE_SIZE, uapi.PAGE_SIZE))
    pds = array.array("Q", range(_LEAF, IDENTITY_LIMIT, 1 << uapi.PMD_SHIFT))
    return pml4.tobytes() + pdpt.tobytes() + pds.tobytes()


def install(hva: int, gib_pages: bool) -> None:
    """Write the page tables into the private memory at host address ``hva``."""
    tables = page_tables(gib_pages)
    ctypes.memmove(hva + PML4_OFFSET, tables, len(tables))


def area(hva: int, index: int) -> ProgramArea:
    if not 0 <= index < MAX_PROGRAM_VCPUS:
        raise ValueError(f"the twin runs programs on at most {MAX_PROGRAM_VCPUS} vCPUs per VM")
    offset = AREAS_OFFSET + index * AREA_SIZE
    return ProgramArea(
        code_gpa=PRIVATE_GPA + offset,
        code_hva=hva + offset,
        code_size=AREA_SIZE - STACK_SIZE,
        stack_top_gpa=PRIVATE_GPA + offset + AREA_SIZE,
    )


def long_mode_sregs(sregs: uapi.kvm_sregs) -> None:
    """Turn the vCPU's reset sregs into 64-bit CPL3 with the twin's page tables."""
    _segment(sregs.cs, USER_CS, seg_type=0xB, long=1, db=0)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _segment(seg, USER_DS, seg_type=0x3, long=0, db=1)
    # A busy 64-bit TSS: VM entry checks TR even though nothing here uses it.
    sregs.tr.type, sregs.tr.present, sregs.tr.s, sregs.tr.unusable = 0xB, 1, 0, 0
    sregs.cr0 = CR0_LONG
    sregs.cr3 = PRIVATE_GPA + PML4_OFFSET
    sregs.cr4 = CR4_PAE
    sregs.efer = EFER_LONG


def _segment(seg: uapi.kvm_segment, selector: int, *, seg_type: int, long: int, db: int) -> None:
    seg.base, seg.limit, seg.selector = 0, 0xFFFFFFFF, selector
    seg.type, seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g = seg_type, 1, 3, db, 1, long, 1
    seg.avl, seg.unusable = 0, 0
