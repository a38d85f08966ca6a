"""Spinlocks, mutexes and rw-semaphores as interleavable steps.

``cpa_lock``, ``mmu_lock``, ``slots_lock``, ``filemap_invalidate_lock``... are
modelled by what matters to an interleaving: who holds them.  Taking one is a
step; when it is held, the task yields ``(WAIT, (mode, key))`` and a scheduler
resumes it only once :meth:`Locks.blocked` says it can proceed.  Spinlock and
mutex differ only in what the real kernel may do while waiting, which the
model does not need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gmemlab.model.task import WAIT, KGen

if TYPE_CHECKING:
    from gmemlab.model.machine import Machine


class Locks:
    __slots__ = ("held", "readers")

    def __init__(self) -> None:
        self.held: dict[Any, str] = {}  # key -> holder task (exclusive holders)
        self.readers: dict[Any, int] = {}  # rwsem key -> number of readers

    def blocked(self, mode: str, key: Any, m: Machine) -> bool:
        """Would a task waiting in ``mode`` on ``key`` still have to wait?"""
        if mode == "folio":
            return m.mem.test_locked(key)
        if mode == "mmu_invalidate":
            kvm = m.kvms.get(key)  # a destroyed VM has no invalidation left to wait for
            return kvm is not None and bool(kvm.mmu_invalidate_in_progress)
        if mode == "read":
            return key in self.held
        if mode == "write":
            return key in self.held or self.readers.get(key, 0) > 0
        return key in self.held

    def state(self) -> tuple[tuple[str, ...], tuple[tuple[str, int], ...]]:
        """A hashable snapshot, for the checker's state fingerprints."""
        return (
            tuple(sorted(f"{k}:{v}" for k, v in self.held.items())),
            tuple(sorted((str(k), n) for k, n in self.readers.items() if n)),
        )


def spin_lock(m: Machine, key: Any) -> KGen[None]:
    locks = m.locks
    while True:
        yield ("lock", key)
        if key not in locks.held:
            locks.held[key] = m.current.name
            return
        yield (WAIT, ("lock", key))


def spin_unlock(m: Machine, key: Any) -> KGen[None]:
    yield ("unlock", key)
    del m.locks.held[key]


mutex_lock = spin_lock
mutex_unlock = spin_unlock


def down_read(m: Machine, key: Any) -> KGen[None]:
    locks = m.locks
    while True:
        yield ("lock", key)
        if key not in locks.held:
            locks.readers[key] = locks.readers.get(key, 0) + 1
            return
        yield (WAIT, ("read", key))


def up_read(m: Machine, key: Any) -> KGen[None]:
    yield ("unlock", key)
    m.locks.readers[key] -= 1


def down_write(m: Machine, key: Any) -> KGen[None]:
    locks = m.locks
    while True:
        yield ("lock", key)
        if key not in locks.held and not locks.readers.get(key, 0):
            locks.held[key] = m.current.name
            return
        yield (WAIT, ("write", key))


up_write = spin_unlock
