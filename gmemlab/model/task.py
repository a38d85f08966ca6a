"""Kernel paths as interleavable generators.

Every modelled kernel function that touches state another CPU can observe is a
generator.  It ``yield``\\ s a :data:`Step` *before* each such action; the code
between two yields runs atomically.  A step names what the next action touches
(its *footprint*), so a scheduler can tell which steps of different tasks
commute.

* Normal use: :func:`run_sync` runs one path to completion on one CPU, the way
  a syscall runs.
* The checker (``gmemlab.check``) drives several paths at once, choosing which
  task takes its next step; the same code runs, so nothing observable hides
  inside a big atomic function.

A task that must wait (a contended folio lock, an rwsem) yields a
``("wait", key)`` step and re-tries when resumed; a scheduler must not resume it
before ``key`` is released.  In :func:`run_sync` there is nobody else to release
it, so waiting is a model deadlock.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

# A step: (kind, key).  ``key`` identifies the object the next atomic action touches,
# e.g. ("folio", pfn), ("dmap", pfn), ("tlb", cpu), ("lock", "invalidate", inode_no).
Step = tuple[str, Any]
KGen = Generator[Step, None, T]

WAIT = "wait"


@dataclass(slots=True)
class Task:
    """A kernel execution context (``current``), pinned to one CPU."""

    name: str
    cpu: int = 0


class ModelDeadlock(RuntimeError):
    """A task waited for a lock that no other task can release."""


def run_sync(gen: KGen[T]) -> T:
    """Run a kernel path straight through (no interleaving) and return its result."""
    send = gen.send
    try:
        step = send(None)
        while True:
            if step[0] == WAIT:
                gen.close()
                raise ModelDeadlock(f"waiting for {step[1]!r} with no other task to release it")
            step = send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
