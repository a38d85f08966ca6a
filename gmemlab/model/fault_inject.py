"""Fault injection, after the kernel's ``lib/fault-inject.c``.

Named sites stand where the kernel can fail:

* ``pt_alloc``: the page-table allocation of a direct-map split
  (``split_large_page`` -> ``alloc_pages``): the zap returns ``-ENOMEM``.
* ``page_alloc``: any other page allocation (``should_fail_alloc_page``).
* ``signal_pending``: a signal arrives during a long loop such as
  ``kvm_gmem_allocate`` (``-EINTR``).

A site fires after ``after`` calls have passed, ``times`` times (-1: forever),
and with ``probability`` drawn from a seeded generator, so every injected run
is reproducible from its seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SITES = ("pt_alloc", "page_alloc", "signal_pending")


@dataclass(slots=True)
class _Arm:
    after: int
    times: int
    probability: float


class FaultInject:
    __slots__ = ("_arms", "fired", "rng")

    def __init__(self, seed: int = 0) -> None:
        self._arms: dict[str, _Arm] = {}
        self.rng = random.Random(seed)
        self.fired: dict[str, int] = dict.fromkeys(SITES, 0)

    def arm(self, site: str, *, times: int = 1, after: int = 0, probability: float = 1.0) -> None:
        if site not in SITES:
            raise ValueError(f"unknown fault-injection site {site!r}; known: {', '.join(SITES)}")
        if not 0.0 <= probability <= 1.0:
            raise ValueError("probability must be within [0, 1]")
        self._arms[site] = _Arm(after, times, probability)

    def disarm(self, site: str) -> None:
        self._arms.pop(site, None)

    def armed(self) -> bool:
        """Is any site armed (so every call of :meth:`should_fail` counts)?"""
        return bool(self._arms)

    def should_fail(self, site: str) -> bool:
        arm = self._arms.get(site)
        if arm is None:
            return False
        if arm.after > 0:
            arm.after -= 1
            return False
        if arm.times == 0:
            return False
        if arm.probability < 1.0 and self.rng.random() >= arm.probability:
            return False
        if arm.times > 0:
            arm.times -= 1
        self.fired[site] += 1
        return True
