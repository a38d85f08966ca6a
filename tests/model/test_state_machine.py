"""Random operation sequences on one guest_memfd, invariants checked after every step.

A Hypothesis ``RuleBasedStateMachine`` drives VMM writes and reads through the
mapping, guest writes and reads, punch-holes, fallocate, gadget reads on any CPU,
kernel page reuse and remapping.  After each rule the model's own hooks have
judged every change, ``check_all()`` sweeps the whole machine, and every byte
read must be what an oracle of the file's contents says.  Designs that hold the
invariants (v12 with the flag, mainline without it) must survive any sequence;
a failure prints the shrunk sequence that reproduces it.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from gmemlab.api import run_program
from gmemlab.guest import GuestProgram
from gmemlab.model.host import GuestMemfd, Host, Mapping, VcpuFd, VmFd
from gmemlab.uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
    KVM_MEM_GUEST_MEMFD,
)
from tests.conftest import model_host

PAGE = 4096
PAGES = 8
GPA = 1 << 32
SHARED = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED

pages = st.integers(0, PAGES - 1)
values = st.integers(1, 255)


class GuestMemfdMachine(RuleBasedStateMachine):
    design = "v12"
    flags = SHARED | GUEST_MEMFD_FLAG_NO_DIRECT_MAP

    h: Host
    vm: VmFd
    gmem: GuestMemfd
    mem: Mapping
    vcpu: VcpuFd

    @initialize()
    def setup(self) -> None:
        self.h = model_host(self.design, ncpus=3, low_ram_mib=16)
        self.vm = self.h.open_kvm().create_vm()
        self.gmem = self.vm.create_guest_memfd(PAGES * PAGE, self.flags)
        self.mem = self.gmem.mmap(PAGES * PAGE)
        self.vm.set_user_memory_region2(1, KVM_MEM_GUEST_MEMFD, GPA, PAGES * PAGE, self.mem.addr,
                                        self.gmem, 0)
        self.vcpu = self.vm.create_vcpu(0, cpu=1)
        self.oracle = [0] * PAGES  # every byte of page i holds oracle[i]

    def guest(self, program: GuestProgram) -> list[int]:
        result = run_program(self.vcpu, program)
        assert result.ok, result
        return result.reports

    @rule(page=pages, value=values)
    def vmm_write(self, page: int, value: int) -> None:
        self.mem.fill(page * PAGE, PAGE, value)
        self.oracle[page] = value

    @rule(page=pages)
    def vmm_read(self, page: int) -> None:
        assert self.mem.read(page * PAGE, PAGE) == bytes((self.oracle[page],)) * PAGE

    @rule(page=pages, value=values)
    def guest_write(self, page: int, value: int) -> None:
        self.guest(GuestProgram().fill(GPA + page * PAGE, PAGE, value))
        self.oracle[page] = value

    @rule(page=pages)
    def guest_read(self, page: int) -> None:
        assert self.guest(GuestProgram().report(GPA + page * PAGE + 17)) == [self.oracle[page]]

    @rule(page=pages, n=st.integers(1, 3))
    def punch_hole(self, page: int, n: int) -> None:
        n = min(n, PAGES - page)
        self.gmem.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, page * PAGE, n * PAGE)
        self.oracle[page : page + n] = [0] * n

    @rule(page=pages, n=st.integers(1, 3))
    def allocate(self, page: int, n: int) -> None:
        n = min(n, PAGES - page)
        self.gmem.fallocate(FALLOC_FL_KEEP_SIZE, page * PAGE, n * PAGE)

    @rule(page=pages, cpu=st.integers(0, 2))
    def gadget(self, page: int, cpu: int) -> None:
        pfn = self.gmem.pfn(page * PAGE)
        if pfn >= 0:
            self.h.gadget_read(cpu, pfn)  # judged by invariant gadget-blocked

    @rule(cpu=st.integers(0, 2))
    def kernel_reuses_a_frame(self, cpu: int) -> None:
        self.h.kernel_alloc(cpu)

    @rule()
    def remap(self) -> None:
        self.mem.munmap()
        self.mem = self.gmem.mmap(PAGES * PAGE)  # KVM's userspace_addr now dangles: unused here

    @invariant()
    def machine_is_consistent(self) -> None:
        if hasattr(self, "h"):
            self.h.machine.inv.check_all()


class MainlineMachine(GuestMemfdMachine):
    design = "base"
    flags = SHARED


SETTINGS = settings(max_examples=60, stateful_step_count=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
TestV12 = GuestMemfdMachine.TestCase
TestV12.settings = SETTINGS
TestMainline = MainlineMachine.TestCase
TestMainline.settings = SETTINGS


def test_the_machine_catches_a_broken_design() -> None:
    """The same rules on v12 without the flush (Firecracker's 0039) break an invariant."""
    import pytest
    from hypothesis.stateful import run_state_machine_as_test

    from gmemlab.model import InvariantViolation

    class NoFlushMachine(GuestMemfdMachine):
        design = "noflush"

    with pytest.raises(InvariantViolation) as e:
        run_state_machine_as_test(NoFlushMachine, settings=settings(
            SETTINGS, max_examples=40, database=None, print_blob=False))
    assert e.value.name in ("handout-flushed", "gadget-blocked")
