"""Architecture profiles: the config and hardware facts that gate the feature.

A profile says what a host is: which VM types KVM accepts, whether
guest_memfd and memory attributes are built, how the direct map is laid out
and changed, how kernel TLB flushes reach other CPUs.  What KVM *advertises*
for ``NO_DIRECT_MAP`` is code of the series, so it lives in the designs
(``kvm_arch_gmem_supports_no_direct_map()`` changed between v7, v10 and v12);
it reads the facts here:

* x86: ``can_set_direct_map()`` is the generic default (true with
  ``CONFIG_ARCH_HAS_SET_DIRECT_MAP``); the direct map uses 1G/2M/4K leaves; CPA
  does not flush; ``flush_tlb_kernel_range()`` sends IPIs.
* arm64 (``arch/arm64/mm/mmu.c``, ``pageattr.c``, mainline since 6.18):
  ``can_set_direct_map()`` = rodata_full || debug_pagealloc || kfence || realm;
  without it ``set_direct_map_*`` are silent no-ops.  ``force_pte_mapping()``
  decides the linear map's layout at boot: page granular with debug_pagealloc,
  or without BBML2_NOABORT on every CPU when ``can_set_direct_map()``; with
  BBML2_NOABORT the linear map keeps its blocks and ``update_range_prot()``
  splits the leaf on demand (``split_kernel_leaf_mapping()``, which allocates
  page tables and can fail with -ENOMEM).  ``set_memory_valid()`` flushes when
  it clears PTE_VALID and not when it sets it (``__change_memory_common()``).
  Stage-2 needs FEAT_S2FWB, else ``kvm_pgtable_stage2_map()`` cleans the cache
  through the (zapped) linear alias.  TLBI is broadcast (no IPIs), and
  ``flush_tlb_kernel_range()`` invalidates page by page up to MAX_DVM_OPS
  (PTRS_PER_PTE) pages.
* riscv: has ``set_direct_map_*`` but selects no ``KVM_GUEST_MEMFD``, so there is
  no guest_memfd at all.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from gmemlab.uapi import (
    KVM_X86_DEFAULT_VM,
    KVM_X86_SEV_ES_VM,
    KVM_X86_SEV_VM,
    KVM_X86_SNP_VM,
    KVM_X86_SW_PROTECTED_VM,
    KVM_X86_TDX_VM,
)

Arch = Literal["x86_64", "arm64", "riscv64"]


@dataclass(frozen=True, slots=True)
class ArchProfile:
    name: str
    arch: Arch
    description: str
    vm_types: frozenset[int] = frozenset({KVM_X86_DEFAULT_VM})
    has_guest_memfd: bool = True  # CONFIG_KVM_GUEST_MEMFD
    memory_attributes: bool = False  # CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES (SW_PROTECTED etc.)
    has_set_direct_map: bool = True  # CONFIG_ARCH_HAS_SET_DIRECT_MAP
    gbpages: bool = True  # X86_DIRECT_GBPAGES
    # arm64 can_set_direct_map() inputs and stage-2 cache maintenance
    rodata_full: bool = False
    debug_pagealloc: bool = False
    kfence: bool = False
    realm: bool = False
    s2fwb: bool = False
    # BBML2_NOABORT on every CPU (system_supports_bbml2_noabort()): live block mappings can be
    # split without break-before-make, so rodata_full no longer forces page mappings.
    bbml2: bool = False
    set_direct_map_flushes: bool = False  # arm64 set_memory_valid(addr, n, 0) flushes itself
    tlb_broadcast: bool = False  # TLBI IS / INVLPGB: no IPIs
    # flush_tlb_kernel_range(): above this many pages, flush everything (x86
    # tlb_single_page_flush_ceiling; arm64 MAX_DVM_OPS = PTRS_PER_PTE).
    tlb_flush_ceiling: int = 33
    # guest_memfd backs each 2 MiB of a file with one PMD-order folio where it can (a what-if:
    # the THP/hugetlb guest_memfd work, see kvm_gmem_get_huge_folio()); mainline never does.
    gmem_thp: bool = False
    secretmem_enable: bool = True
    nr_memslots: int = 32764
    max_vcpus: int = 1024
    nr_vcpus: int = 2
    # kvm_arch_vm_ioctl()'s answer to an ioctl it does not know (KVM_CREATE_GUEST_MEMFD
    # where guest_memfd is not built): x86 -ENOTTY, arm64 and riscv -EINVAL.
    unknown_vm_ioctl_errno: int = 25
    # X86_BUG_TDX_PW_MCE (partial-write machine check): tdx_quirk_reset_page() zeroes
    # pages the TDX module gives back with MOVDIR64B through the direct map.
    tdx_pw_mce: bool = False
    # WHAT IF, not a kernel: the series' VM-type exclusion (TDX since v10, SNP since
    # v12) lifted, so NO_DIRECT_MAP reaches the arch hooks it was kept from.
    what_if_coco_no_direct_map: bool = False

    @property
    def can_set_direct_map(self) -> bool:
        """``can_set_direct_map()``."""
        if not self.has_set_direct_map:
            return False
        if self.arch == "arm64":
            return self.rodata_full or self.debug_pagealloc or self.kfence or self.realm
        return True

    @property
    def force_pte_mapping(self) -> bool:
        """arm64 ``force_pte_mapping()`` (``arch/arm64/mm/mmu.c``): must the linear map be
        page granular?  debug_pagealloc always; rodata_full, kfence or realm only
        without BBML2_NOABORT."""
        if self.arch != "arm64":
            return False
        if self.debug_pagealloc:
            return True
        if self.bbml2:
            return False
        return self.rodata_full or self.kfence or self.realm

    @property
    def direct_map_granularity(self) -> Literal["blocks", "4k"]:
        """How the direct map is laid out at boot: 1G/2M/4K leaves (x86 ``split_mem_range()``,
        arm64 ``map_mem()`` without NO_BLOCK_MAPPINGS), or 4K pages only."""
        return "4k" if self.force_pte_mapping else "blocks"

    @property
    def split_on_demand(self) -> bool:
        """arm64 ``split_leaf_mapping_possible()``: BBML2_NOABORT and not page-mapped at boot."""
        return self.arch == "arm64" and self.bbml2 and not self.force_pte_mapping

    def has_private_mem(self, vm_type: int) -> bool:
        """``kvm_arch_has_private_mem()``: x86 SW_PROTECTED, SNP and TDX VMs."""
        if self.arch != "x86_64":
            return False
        return vm_type in (KVM_X86_SW_PROTECTED_VM, KVM_X86_SNP_VM, KVM_X86_TDX_VM)

    def supports_gmem_init_shared(self, vm_type: int | None) -> bool:
        """``kvm_arch_supports_gmem_init_shared()``: x86 says no for private-memory VMs."""
        return vm_type is None or not self.has_private_mem(vm_type)

    def has_arch_gmem_prepare(self, vm_type: int) -> bool:
        """``CONFIG_HAVE_KVM_ARCH_GMEM_PREPARE``/``_INVALIDATE`` hooks that act: SEV-SNP."""
        return self.arch == "x86_64" and vm_type == KVM_X86_SNP_VM

    def with_(self, **changes: object) -> ArchProfile:
        return replace(self, **changes)  # type: ignore[arg-type]


_X86_ALL_TYPES = frozenset(
    {KVM_X86_DEFAULT_VM, KVM_X86_SW_PROTECTED_VM, KVM_X86_SEV_VM, KVM_X86_SEV_ES_VM,
     KVM_X86_SNP_VM, KVM_X86_TDX_VM}
)

PROFILES: dict[str, ArchProfile] = {
    p.name: p
    for p in (
        ArchProfile(
            "x86_64",
            "x86_64",
            "x86-64 host with every VM type (default, SW_PROTECTED, SEV, SEV-ES, SNP, TDX)",
            vm_types=_X86_ALL_TYPES,
            memory_attributes=True,
        ),
        ArchProfile(
            "x86_64-what-if-snp-tdx",
            "x86_64",
            "WHAT IF (no posted kernel): x86_64 with every VM type, NO_DIRECT_MAP offered to "
            "SNP and TDX VMs too (the series' exclusion lifted), TDX with the partial-write "
            "erratum: shows why the series excludes them",
            vm_types=_X86_ALL_TYPES,
            memory_attributes=True,
            tdx_pw_mce=True,
            what_if_coco_no_direct_map=True,
        ),
        ArchProfile(
            "x86_64-gmem-thp",
            "x86_64",
            "what if: x86-64 (every VM type) whose guest_memfd allocates 2 MiB folios, as "
            "KVM_GUEST_MEMFD_ALLOW_HUGEPAGE did (20231027182217.3615211-18-seanjc@google.com)",
            vm_types=_X86_ALL_TYPES,
            memory_attributes=True,
            gmem_thp=True,
        ),
        ArchProfile(
            "x86_64-kvm_pvm-6.18",
            "x86_64",
            "this project's machines: Linux 6.18 kvm_pvm (nested), default VM type only, "
            "no memory attributes (realkernel.md §1)",
        ),
        ArchProfile(
            "arm64",
            "arm64",
            "arm64 before BBML2_NOABORT, with rodata_full (linear map page-granular at boot) "
            "and FEAT_S2FWB",
            unknown_vm_ioctl_errno=22,
            rodata_full=True,
            s2fwb=True,
            set_direct_map_flushes=True,
            tlb_broadcast=True,
            tlb_flush_ceiling=512,
        ),
        ArchProfile(
            "arm64-bbml2",
            "arm64",
            "arm64 with BBML2_NOABORT, rodata_full and FEAT_S2FWB: block-mapped linear map, "
            "leaves split on demand (may fail with ENOMEM)",
            unknown_vm_ioctl_errno=22,
            rodata_full=True,
            s2fwb=True,
            bbml2=True,
            set_direct_map_flushes=True,
            tlb_broadcast=True,
            tlb_flush_ceiling=512,
        ),
        ArchProfile(
            "arm64-no-s2fwb",
            "arm64",
            "arm64 with rodata_full but without FEAT_S2FWB (e.g. Graviton2 / m6g.metal)",
            unknown_vm_ioctl_errno=22,
            rodata_full=True,
            set_direct_map_flushes=True,
            tlb_broadcast=True,
            tlb_flush_ceiling=512,
        ),
        ArchProfile(
            "arm64-rodata-off",
            "arm64",
            "arm64 booted with rodata=off: block-mapped linear map, can_set_direct_map() false",
            unknown_vm_ioctl_errno=22,
            s2fwb=True,
            set_direct_map_flushes=True,
            tlb_broadcast=True,
            tlb_flush_ceiling=512,
        ),
        ArchProfile(
            "riscv64",
            "riscv64",
            "riscv64: set_direct_map_* exist but KVM builds no guest_memfd",
            has_guest_memfd=False,
            unknown_vm_ioctl_errno=22,
        ),
    )
}
