"""The batched paths behind ``m.ranges``, when :mod:`.gate` lets them stand in."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from gmemlab.model.ranges import PerPage, fault, free

if TYPE_CHECKING:
    from gmemlab.guest import Check, Fill, Touch
    from gmemlab.model.fs import Inode
    from gmemlab.model.kvm.kvm_main import Kvm
    from gmemlab.model.kvm.vcpu import Vcpu
    from gmemlab.model.machine import Machine
    from gmemlab.model.mm.filemap import AddressSpace
    from gmemlab.model.mm.memory import BulkOp, Process, UserOp, Vma
    from gmemlab.model.task import KGen


class Batched(PerPage):
    """Each loop head tries its batched path (:mod:`.fault`, :mod:`.free`) first."""

    __slots__ = ()

    def guest_access(self, m: Machine, vcpu: Vcpu, op: Touch | Fill | Check) -> bool:
        return fault.guest_access(m, vcpu, op)

    def user_access(self, m: Machine, proc: Process, addr: int, length: int, done: int, write: bool,
                    op: UserOp, bulk: BulkOp | None) -> tuple[int, bool]:
        return fault.user_access(m, proc, addr, length, done, write, op, bulk)

    def unmap_gfn_range(self, m: Machine, kvm: Kvm, start: int, end: int, fn: str) -> int | None:
        return free.unmap_gfn_range(m, kvm, start, end, fn)

    def truncate(self, m: Machine, mapping: AddressSpace, start: int, end: int | None) -> int | None:
        return free.truncate(m, mapping, start, end)

    def zap_user_range(self, m: Machine, vma: Vma) -> bool:
        return free.zap_user_range(m, vma)

    def allocate(self, m: Machine, inode: Inode, start: int, end: int,
                 one: Callable[[int], KGen[int]]) -> int | None:
        return free.allocate(m, inode, start, end, one)


BATCHED = Batched()
