"""Linux 6.18 without the series: the kernel this project's machines run.

``virt/kvm/guest_memfd.c`` at v6.18: ``__kvm_gmem_get_pfn()`` reports
``*is_prepared = folio_test_uptodate(folio)`` and ``kvm_gmem_get_pfn()`` calls
``kvm_gmem_prepare_folio()`` (zero, ``__kvm_gmem_prepare_folio()`` -> the arch
hook, ``kvm_gmem_mark_prepared()``) only ``if (!is_prepared)``.  A folio the
user fault zeroed first (``kvm_gmem_fault_user_mapping()`` marks it uptodate)
is therefore never arch-prepared.  kvm/next replaced this with "zero if not
uptodate, prepare every time" (Michael Roth, "KVM: guest_memfd: Remove
preparation tracking"), which is :class:`~gmemlab.model.designs.base.Design`;
series-spec.md calls that later code "upstream".  Everything else (user fault,
``->free_folio``, secretmem, GUP) is the same code in both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from gmemlab.model.designs.base import (
    Design,
    GetPfnResult,
    kvm_gmem_get_pfn_done,
    kvm_gmem_get_pfn_folio,
    kvm_gmem_prepare_folio_tracked,
)
from gmemlab.model.task import KGen

if TYPE_CHECKING:
    from gmemlab.model.kvm.kvm_main import Kvm, Memslot
    from gmemlab.model.machine import Machine


def kvm_gmem_get_pfn_618(m: Machine, kvm: Kvm, slot: Memslot, gfn: int) -> KGen[GetPfnResult]:
    """``kvm_gmem_get_pfn()`` (v6.18): ``if (!is_prepared) r = kvm_gmem_prepare_folio()``."""
    file, folio = yield from kvm_gmem_get_pfn_folio(m, slot, gfn)
    if folio < 0:
        return (yield from kvm_gmem_get_pfn_done(m, file, folio, -1))
    r = 0
    if not m.mem.test_uptodate(folio):  # is_prepared = folio_test_uptodate(folio)
        r = yield from kvm_gmem_prepare_folio_tracked(m, kvm, gfn, folio)
    return (yield from kvm_gmem_get_pfn_done(m, file, r, folio))


class Linux618(Design):
    """v6.18 mainline: kvm/next's paths but the guest fault's preparedness tracking."""

    name: ClassVar[str] = "6.18"
    title: ClassVar[str] = ("Linux 6.18 without the series (our machines): the guest fault "
                            "prepares only a folio that is not uptodate")
    source: ClassVar[str] = "torvalds/linux v6.18 virt/kvm/guest_memfd.c kvm_gmem_get_pfn()"

    def kvm_gmem_get_pfn(self, m: Machine, kvm: Kvm, slot: Memslot, gfn: int) -> KGen[GetPfnResult]:
        return (yield from kvm_gmem_get_pfn_618(m, kvm, slot, gfn))
