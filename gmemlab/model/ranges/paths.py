"""The batched paths behind ``m.ranges``, each where :mod:`.gate` lets it stand in."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from gmemlab.model.ranges import MIRRORS, PER_PAGE, Mirror, PerPage, fault, free
from gmemlab.model.ranges.gate import Gate

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
    """Each loop head the gate passed tries its batched path (:mod:`.fault`, :mod:`.free`)
    first; the others answer as :class:`PerPage` does.

    ``mirror`` tells the path running now which pinned design's code it stands for.
    """

    __slots__ = ("mirrors",)

    def __init__(self, gate: Gate) -> None:
        super().__init__()
        self.mirrors = {p.path: MIRRORS[p.mirror] for p in gate.paths if p.mirror}

    def _enter(self, path: str) -> Mirror | None:
        mirror = self.mirrors.get(path)
        if mirror is None:
            return None
        outer, self.mirror = self.mirror, mirror
        return outer

    def guest_access(self, m: Machine, vcpu: Vcpu, op: Touch | Fill | Check) -> bool:
        outer = self._enter("guest_access")
        if outer is None:
            return False
        try:
            return fault.guest_access(m, vcpu, op)
        finally:
            self.mirror = outer

    def user_access(self, m: Machine, proc: Process, addr: int, length: int, done: int, write: bool,
                    op: UserOp, bulk: BulkOp | None) -> tuple[int, bool]:
        outer = self._enter("user_access")
        if outer is None:
            return 0, False
        try:
            return fault.user_access(m, proc, addr, length, done, write, op, bulk)
        finally:
            self.mirror = outer

    def unmap_gfn_range(self, m: Machine, kvm: Kvm, start: int, end: int, fn: str) -> int | None:
        outer = self._enter("unmap_gfn_range")
        if outer is None:
            return None
        try:
            return free.unmap_gfn_range(m, kvm, start, end, fn)
        finally:
            self.mirror = outer

    def truncate(self, m: Machine, mapping: AddressSpace, start: int, end: int | None) -> int | None:
        outer = self._enter("truncate")
        if outer is None:
            return None
        try:
            return free.truncate(m, mapping, start, end)
        finally:
            self.mirror = outer

    def zap_user_range(self, m: Machine, vma: Vma) -> bool:
        outer = self._enter("zap_user_range")
        if outer is None:
            return False
        try:
            return free.zap_user_range(m, vma)
        finally:
            self.mirror = outer

    def allocate(self, m: Machine, inode: Inode, start: int, end: int,
                 one: Callable[[int], KGen[int]]) -> int | None:
        outer = self._enter("allocate")
        if outer is None:
            return None
        try:
            return free.allocate(m, inode, start, end, one)
        finally:
            self.mirror = outer


def paths_for(gate: Gate) -> PerPage:
    """What ``m.ranges`` is while a path runs unobserved: batched where the gate allows."""
    return Batched(gate) if gate.mirror else PER_PAGE
