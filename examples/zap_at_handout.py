"""A design of your own, in one file: NO_DIRECT_MAP written from mainline.

Run it through any tool: ``gmemlab run --design-file examples/zap_at_handout.py``,
``gmemlab bench --design examples/zap_at_handout.py``, or
``gmemlab.model.Host(design="examples/zap_at_handout.py")``.

It starts from :class:`~gmemlab.model.designs.base.Design` (mainline), says it
has the series' flag (``series``: offered as v12 offers it, minus the VM types
it excludes), and overrides two hooks: the zap when a folio is handed out (the
user fault, and ``kvm_gmem_get_pfn()`` before the folio is prepared) and the
restore when it is freed.  The marker in ``folio->private`` says which folios
to restore.  Unlike v12 it restores *before* it clears the marker and it keeps
no ``kvm_gmem_folio_*`` wrappers: the hooks are the whole change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from gmemlab.model.designs.base import Design, clear_marker, has_marker, inode_no_direct_map, set_marker
from gmemlab.model.task import KGen
from gmemlab.uapi import KVM_X86_SNP_VM, KVM_X86_TDX_VM

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine


class ZapAtHandout(Design):
    name: ClassVar[str] = "zap-at-handout"
    title: ClassVar[str] = "NO_DIRECT_MAP from mainline: zap at handout, restore at free"
    series: ClassVar[bool] = True  # the flag is offered, AS_NO_DIRECT_MAP set, GUP refuses
    uses_marker: ClassVar[bool] = True
    excluded_vm_types: ClassVar[tuple[int, ...]] = (KVM_X86_TDX_VM, KVM_X86_SNP_VM)

    def kvm_gmem_zap_for_handout(self, m: Machine, folio: int) -> KGen[int]:
        yield ("folio", folio)
        if not inode_no_direct_map(m, folio) or has_marker(m, folio):
            return 0
        m.trace.emit("kvm_gmem_zap_for_handout", "zap", folio)
        r = yield from self.folio_zap_direct_map(m, folio)  # invalidate, then flush
        if not r:
            yield from set_marker(m, folio, "kvm_gmem_zap_for_handout")
        return r

    def kvm_gmem_restore_on_free(self, m: Machine, pfn: int) -> KGen[None]:
        if has_marker(m, pfn):
            m.trace.emit("kvm_gmem_restore_on_free", "restore", pfn)
            if m.inv.enabled:
                m.inv.on_restore(pfn)
            yield from self.folio_restore_direct_map(m, pfn)
            yield from clear_marker(m, pfn, "kvm_gmem_restore_on_free")
