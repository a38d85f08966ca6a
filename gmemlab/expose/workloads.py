"""The exposure workloads: each opens one of the windows issue 5 lists.

Every workload runs unchanged on every design; ``pages`` sets its size.  Guest
and VMM writes are the secrets.  The phase names say which window a phase
measures:

``guest-boot``
    The guest writes all of its memory (first touch through
    ``kvm_gmem_get_pfn``), the host kernel keeps working, the VMM exits, the
    kernel reuses half of the freed frames.  Baseline exposure while the guest
    runs; the zap-to-flush window; a design without the flush; the free path
    (restored frames still hold guest data unless ``init_on_free``).
``vmm-restore``
    The VMM writes a snapshot through its mapping (user faults), the guest reads
    it; then the same run and teardown.
``reuse``
    VM A writes its memory and exits; VM B fallocates the same amount and gets
    A's frames back (the allocator is LIFO), still holding A's data and
    direct-mapped until B's first touch zeroes them; B touches half.  The
    window of a folio allocated by fallocate but not yet mapped.
``primed``
    The VMM fallocates, a gadget on CPU 1 reads every folio while it is still
    direct-mapped (its TLB caches the translations), then the guest on CPU 0
    writes its memory.  Without a flush the attacker keeps those translations
    (v7 06/12: "an attacker could keep a stale TLB entry alive").
``kvm-clock``
    The guest writes its memory and enables kvm-clock with its pvclock in its first
    page; the host runs; the VMM punches that page out (a balloon would), and VM B
    boots and gets the freed frame back.  Where kvm-clock fails silently (the series
    without a pfncache fix) nothing maps the page; with Firecracker's pfncache
    patches a vmap alias maps it from the WRMSR on (the whole page: the guest's data
    around its pvclock), and after the punch-hole the alias, invalidated but not
    unmapped, maps the freed frame and so VM B's data ("temp" exposure).
``secretmem``
    The VMM writes memfd_secret memory, then closes it (secretmem restores the
    direct map and only then zeroes).  For comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gmemlab.expose.scenario import Guest, Scenario

GUEST_SECRET = 0x5A
VMM_SECRET = 0xA5
GADGET_CPU = 1


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    summary: str
    run: Callable[[Scenario, int], None]


def guest_boot(sc: Scenario, pages: int) -> None:
    sc.phase("setup")
    g = sc.new_guest(pages)
    sc.phase("guest writes")
    sc.guest_fill(g, GUEST_SECRET)
    _run_teardown_reuse(sc, pages, g)


def vmm_restore(sc: Scenario, pages: int) -> None:
    sc.phase("setup")
    g = sc.new_guest(pages)
    sc.phase("vmm writes")
    sc.vmm_fill(g, VMM_SECRET)
    sc.phase("guest reads")
    sc.guest_read(g)
    _run_teardown_reuse(sc, pages, g)


def _run_teardown_reuse(sc: Scenario, pages: int, g: Guest) -> None:
    sc.phase("run")
    sc.kernel_allocs(pages // 2)
    sc.phase("teardown")
    sc.close_guest(g)
    sc.phase("reuse")
    sc.kernel_allocs(pages // 2)


def reuse(sc: Scenario, pages: int) -> None:
    sc.phase("setup")
    a = sc.new_guest(pages)
    sc.phase("A writes")
    sc.guest_fill(a, GUEST_SECRET)
    sc.phase("A exits")
    sc.close_guest(a)
    b = sc.new_guest(pages)
    sc.phase("B fallocate")
    sc.fallocate(b)
    sc.phase("B touches half")
    sc.guest_read(b, 0, pages // 2)
    sc.phase("teardown")
    sc.close_guest(b)


def primed(sc: Scenario, pages: int) -> None:
    sc.phase("setup")
    g = sc.new_guest(pages)
    sc.phase("fallocate")
    sc.fallocate(g)
    sc.phase("gadget primes")
    sc.gadget_prime(g.folios(), GADGET_CPU)
    sc.phase("guest writes")
    sc.guest_fill(g, GUEST_SECRET)
    sc.phase("run")
    sc.kernel_allocs(pages // 2)
    sc.phase("teardown")
    sc.close_guest(g)


def kvm_clock(sc: Scenario, pages: int) -> None:
    sc.phase("setup")
    a = sc.new_guest(pages)
    sc.phase("guest writes")
    sc.guest_fill(a, GUEST_SECRET)
    sc.phase("kvm-clock on")
    sc.kvm_clock(a, 0)
    sc.phase("run")
    sc.kernel_allocs(pages // 2)
    sc.phase("pvclock page punched")
    sc.punch(a, 0, 1)
    sc.phase("B boots")
    b = sc.new_guest(pages)
    sc.guest_fill(b, GUEST_SECRET)
    sc.phase("teardown")
    sc.close_guest(b)
    sc.close_guest(a)


def secretmem(sc: Scenario, pages: int) -> None:
    sc.phase("setup")
    f, mapping = sc.secretmem(pages)
    sc.phase("vmm writes")
    sc.secret_fill(mapping, VMM_SECRET)
    sc.phase("run")
    sc.kernel_allocs(pages // 2)
    sc.phase("teardown")
    sc.close_file(f, mapping)
    sc.phase("reuse")
    sc.kernel_allocs(pages // 2)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("guest-boot", "guest writes its memory, host runs, VMM exits, kernel reuses", guest_boot),
        Workload("vmm-restore", "VMM writes a snapshot via mmap, guest reads it, teardown", vmm_restore),
        Workload("reuse", "VM B fallocates the frames VM A freed: stale data, still mapped", reuse),
        Workload("primed", "a gadget caches translations before the guest writes", primed),
        Workload("kvm-clock", "kvm-clock's pfncache maps a guest page; it is punched and reused",
                 kvm_clock),
        Workload("secretmem", "VMM writes memfd_secret memory, then closes it", secretmem),
    )
}
