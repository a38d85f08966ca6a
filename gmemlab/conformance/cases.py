"""The conformance scenarios: each takes an :class:`gmemlab.api.Host` and returns an outcome.

An outcome is JSON-able and deterministic: ``"ok"``, an errno name such as
``"EINVAL"``, ``"SIGBUS"``, or a small dict/list of those and of observed
bytes (run-length encoded by :func:`runs`) and sizes.  Two backends conform
when every case gives equal outcomes on both.

Cases only use the :mod:`gmemlab.api` protocols.  Each :class:`Case` carries

* ``gmem_flags``: the guest_memfd flags it creates its file with (``None`` if it
  creates none); :func:`run_case` raises :class:`Unsupported` when the host's
  VM-scope ``KVM_CAP_GUEST_MEMFD_FLAGS`` lacks one of them;
* ``needs_guest_memfd``: the case is about guest_memfd (every case with ``gmem_flags``,
  and the few that bind or create one otherwise); a kernel without it
  (``KVM_CAP_GUEST_MEMFD`` = 0) answers them all with ENOTTY or EINVAL, so they are
  compared with recorded outcomes there while the rest run live;
* ``direct_map_dependent``: the outcome is expected to change with
  ``GUEST_MEMFD_FLAG_NO_DIRECT_MAP`` (the GUP paths on a gmem mapping succeed on a
  plain guest_memfd and fail with it, as they do on memfd_secret).  Cases
  without the tag must give the same outcome with and without the flag; the
  per-file cases are registered for both, as the v12 selftests run them.

Objects must tolerate a second ``close()`` (cases close a guest_memfd early and
let a ``with`` block close it again).  Most cases follow
``tools/testing/selftests/kvm/guest_memfd_test.c`` (anchors §B) and the
real-guest experiments of realkernel.md §5 (N01-N16).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from functools import partial

from gmemlab import api, uapi
from gmemlab.guest import GuestProgram

Outcome = str | int | bool | None | Sequence["Outcome"] | Mapping[str, "Outcome"]
CaseFn = Callable[[api.Host, int], Outcome]

PAGE = uapi.PAGE_SIZE
TOTAL = 4 * PAGE  # the selftests' guest_memfd size
GMEM_GPA = 4 << 30  # where test_guest_memfd_guest binds its guest_memfd
SLOT = 1
UNBACKED_GPA = 8 << 30
BAD_FD = 0x7FFFFFF0  # far above any fd a test process has open

MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
SHARED = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
NDM = uapi.GUEST_MEMFD_FLAG_NO_DIRECT_MAP
# The flag sets __test_guest_memfd runs with, and the v12 additions with NO_DIRECT_MAP.
ALL_FLAGS = (0, MMAP, SHARED, NDM, NDM | MMAP, NDM | SHARED)
MAPPABLE = (MMAP, SHARED, NDM | MMAP, NDM | SHARED)
SHAREABLE = (SHARED, NDM | SHARED)
PRIVATE_ONLY = (MMAP, NDM | MMAP)


class Unsupported(Exception):
    """The host cannot run this case (e.g. it does not offer a guest_memfd flag it needs)."""


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    doc: str
    gmem_flags: int | None
    needs_vcpu: bool
    direct_map_dependent: bool
    needs_guest_memfd: bool
    fn: CaseFn


CASES: dict[str, Case] = {}


def case(
    name: str,
    *,
    flags: tuple[int, ...] | None = None,
    vcpu: bool = False,
    direct_map_dependent: bool = False,
    guest_memfd: bool = False,
) -> Callable[[CaseFn], CaseFn]:
    """Register ``fn`` once per guest_memfd flag set, as ``name[FLAGS]``; a case with
    ``flags`` (or ``guest_memfd``) needs guest_memfd."""

    def register(fn: CaseFn) -> CaseFn:
        doc = (fn.__doc__ or "").strip()
        for f in flags if flags is not None else (None,):
            full = name if f is None else f"{name}[{uapi.gmem_flags_str(f)}]"
            if full in CASES:
                raise ValueError(f"case {full} registered twice")
            CASES[full] = Case(full, doc, f, vcpu, direct_map_dependent,
                               guest_memfd or flags is not None, fn)
        return fn

    return register


def run_case(c: Case, host: api.Host) -> Outcome:
    """Run ``c`` on ``host``; :class:`Unsupported` if the host lacks its guest_memfd flags."""
    if c.gmem_flags:
        with vm_of(host) as vm:
            offered = vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
        missing = c.gmem_flags & ~offered
        if missing:
            raise Unsupported(f"{c.name}: host does not offer {uapi.gmem_flags_str(missing)}")
    return c.fn(host, c.gmem_flags or 0)


# --- helpers ----------------------------------------------------------------------------------
# Linux aliases ENOTSUP to EOPNOTSUPP; errno.errorcode picks ENOTSUP, the kernel source the other.
# Python's errno module has no EHWPOISON.
_ERRNO_NAMES = {**errno.errorcode, errno.EOPNOTSUPP: "EOPNOTSUPP", uapi.EHWPOISON: "EHWPOISON"}


def errno_name(e: OSError) -> str:
    return _ERRNO_NAMES.get(e.errno or 0, str(e.errno))


def attempt(fn: Callable[[], object]) -> str:
    """``"ok"``, the errno name of a :class:`KernelError`, ``"SIGBUS"`` or ``"SIGSEGV"``."""
    try:
        fn()
    except api.KernelError as e:
        return errno_name(e)
    except api.SigBus:
        return "SIGBUS"
    except api.SigSegv:
        return "SIGSEGV"
    return "ok"


def runs(data: bytes) -> list[Outcome]:
    """Run-length encoding: ``[["aa", 4096], ["00", 4096]]``."""
    out: list[Outcome] = []
    i = 0
    while i < len(data):
        j = i
        while j < len(data) and data[j] == data[i]:
            j += 1
        out.append([f"{data[i]:02x}", j - i])
        i = j
    return out


def exit_outcome(ex: api.VcpuExit | None) -> Outcome:
    """A vCPU exit as ``{"exit": "MemoryFault", "gpa": ..., "errno": "EFAULT", ...}`` (bytes as
    hex, an errno by name)."""
    if ex is None:
        return None
    fields = {k: v.hex() if isinstance(v, bytes) else _ERRNO_NAMES[v] if k == "errno" else v
              for k, v in asdict(ex).items()}
    return {"exit": type(ex).__name__, **fields}


def program_outcome(result: api.ProgramResult) -> Outcome:
    return {
        "done": result.done,
        "reports": list(result.reports),
        "check_failures": list(result.check_failures),
        "last_exit": exit_outcome(result.last_exit),
    }


@contextmanager
def vm_of(host: api.Host, vm_type: int = uapi.KVM_X86_DEFAULT_VM) -> Iterator[api.VmFd]:
    with host.open_kvm() as kvm, kvm.create_vm(vm_type) as vm:
        yield vm


@contextmanager
def gmem_of(host: api.Host, flags: int, size: int = TOTAL) -> Iterator[api.GuestMemfd]:
    with vm_of(host) as vm, vm.create_guest_memfd(size, flags) as gmem:
        yield gmem


@dataclass(slots=True)
class GuestSetup:
    vm: api.VmFd
    vcpu: api.VcpuFd
    gmem: api.GuestMemfd


@contextmanager
def guest_of(host: api.Host, flags: int, size: int = PAGE) -> Iterator[GuestSetup]:
    """A VM with vCPU 0 and a guest_memfd of ``size`` bound at GMEM_GPA with userspace_addr=0."""
    with ExitStack() as stack:
        vm = stack.enter_context(vm_of(host))
        gmem = stack.enter_context(vm.create_guest_memfd(size, flags))
        bind(vm, gmem, size)
        vcpu = stack.enter_context(vm.create_vcpu(0))
        yield GuestSetup(vm, vcpu, gmem)


def secret_file(host: api.Host) -> api.MemFile:
    """memfd_secret(0); :class:`Unsupported` where the kernel has it disabled (ENOSYS)."""
    try:
        return host.memfd_secret()
    except api.KernelError as e:
        if e.errno == errno.ENOSYS:
            raise Unsupported("memfd_secret is not available (ENOSYS)") from e
        raise


def bind(
    vm: api.VmFd,
    gmem: api.GuestMemfd | int,
    size: int,
    *,
    slot: int = SLOT,
    gpa: int = GMEM_GPA,
    offset: int = 0,
    flags: int = uapi.KVM_MEM_GUEST_MEMFD,
) -> None:
    vm.set_user_memory_region2(slot, flags, gpa, size, 0, gmem, offset)


def unbind(vm: api.VmFd, slot: int = SLOT, gpa: int = GMEM_GPA) -> None:
    vm.set_user_memory_region2(slot, uapi.KVM_MEM_GUEST_MEMFD, gpa, 0)


def host_read(gmem: api.GuestMemfd, length: int = PAGE) -> Outcome:
    """What the host sees through a fresh shared mapping: runs of bytes, or the fault."""
    with gmem.mmap(length) as m:
        try:
            return runs(m.read(0, length))
        except api.SigBus:
            return "SIGBUS"


def host_fill(gmem: api.GuestMemfd, value: int, length: int = PAGE) -> None:
    with gmem.mmap(length) as m:
        m.fill(0, length, value)


def run(setup: GuestSetup, program: GuestProgram) -> Outcome:
    return program_outcome(api.run_program(setup.vcpu, program))


# --- creation ---------------------------------------------------------------------------------
@case("create.flag_bits", direct_map_dependent=True)
def _create_flag_bits(host: api.Host, _: int) -> Outcome:
    """test_guest_memfd_flags: bit 0..63 is accepted iff the VM-scope cap has it, else EINVAL."""
    with vm_of(host) as vm:
        cap = vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
        accepted, rejected = [], set()
        for bit in range(64):
            result = attempt(partial(_create_and_close, vm, PAGE, 1 << bit))
            if result == "ok":
                accepted.append(bit)
            else:
                rejected.add(result)
    return {
        "vm_cap": cap,
        "accepted_bits": accepted,
        "rejected_errnos": sorted(rejected),
        "matches_cap": sum(1 << b for b in accepted) == cap,
    }


@case("create.cap_scopes", direct_map_dependent=True)
def _create_cap_scopes(host: api.Host, _: int) -> Outcome:
    """KVM_CAP_GUEST_MEMFD_FLAGS asked of /dev/kvm and of a default VM."""
    with host.open_kvm() as kvm, kvm.create_vm() as vm:
        return {
            "system": kvm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS),
            "vm": vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS),
        }


@case("create.invalid_sizes", flags=ALL_FLAGS)
def _create_invalid_sizes(host: api.Host, flags: int) -> Outcome:
    """test_create_guest_memfd_invalid_sizes plus size 0, PAGE+1 and a negative loff_t."""
    with vm_of(host) as vm:

        def create(size: int) -> str:
            return attempt(partial(_create_and_close, vm, size, flags))

        return {
            "0": create(0),
            "1..4095": sorted({create(size) for size in range(1, PAGE)}),
            "4097": create(PAGE + 1),
            "2^63": create(1 << 63),
            "4096": create(PAGE),
        }


def _create_and_close(vm: api.VmFd, size: int, flags: int) -> None:
    vm.create_guest_memfd(size, flags).close()


@case("create.multiple", guest_memfd=True)
def _create_multiple(host: api.Host, _: int) -> Outcome:
    """test_create_guest_memfd_multiple: 1- and 2-page files, own sizes, distinct inodes."""
    with vm_of(host) as vm, vm.create_guest_memfd(PAGE) as a:
        size_a = a.fstat().st_size
        with vm.create_guest_memfd(2 * PAGE) as b:
            sa, sb = a.fstat(), b.fstat()
            return {
                "sizes": [sa.st_size, sb.st_size],
                "first_unchanged": sa.st_size == size_a,
                "distinct_inodes": sa.st_ino != sb.st_ino,
            }


# --- file operations --------------------------------------------------------------------------
@case("file.read_write", flags=ALL_FLAGS)
def _file_read_write(host: api.Host, flags: int) -> Outcome:
    """test_file_read_write: read/write/pread/pwrite of 64 bytes all fail (no such fops)."""
    with gmem_of(host, flags) as g:
        return {
            "read": attempt(lambda: g.read(64)),
            "write": attempt(lambda: g.write(bytes(64))),
            "pread": attempt(lambda: g.pread(64, 0)),
            "pwrite": attempt(lambda: g.pwrite(bytes(64), 0)),
        }


@case("file.lseek", flags=ALL_FLAGS)
def _file_lseek(host: api.Host, flags: int) -> Outcome:
    """lseek with each whence; the answer is the new offset or the errno."""

    def seek(g: api.GuestMemfd, offset: int, whence: int) -> Outcome:
        try:
            return g.lseek(offset, whence)
        except api.KernelError as e:
            return errno_name(e)

    with gmem_of(host, flags) as g:
        return {
            "SET 4096": seek(g, PAGE, os.SEEK_SET),
            "CUR 0": seek(g, 0, os.SEEK_CUR),
            "END 0": seek(g, 0, os.SEEK_END),
        }


@case("file.ftruncate", flags=ALL_FLAGS)
def _file_ftruncate(host: api.Host, flags: int) -> Outcome:
    """The size is immutable: kvm_gmem_setattr refuses every truncate; st_size stays."""
    with gmem_of(host, flags) as g:
        return {
            "grow": attempt(lambda: g.ftruncate(2 * TOTAL)),
            "shrink": attempt(lambda: g.ftruncate(PAGE)),
            "same": attempt(lambda: g.ftruncate(TOTAL)),
            "st_size_after": g.fstat().st_size,
        }


@case("file.fstat", flags=ALL_FLAGS)
def _file_fstat(host: api.Host, flags: int) -> Outcome:
    """test_file_size: st_size is the creation size, st_blksize the page size; S_IFREG."""
    with gmem_of(host, flags) as g:
        st = g.fstat()
        return {
            "st_size": st.st_size,
            "st_blksize": st.st_blksize,
            "regular": (st.st_mode & 0o170000) == 0o100000,
        }


# --- mmap and faults --------------------------------------------------------------------------
@case("mmap.shared", flags=ALL_FLAGS)
def _mmap_shared(host: api.Host, flags: int) -> Outcome:
    """MAP_SHARED of one page and of the whole file: ok with MMAP, else ENODEV."""
    with gmem_of(host, flags) as g:
        return {
            "one_page": attempt(lambda: g.mmap(PAGE).munmap()),
            "whole": attempt(lambda: g.mmap(TOTAL).munmap()),
        }


@case("mmap.private", flags=ALL_FLAGS)
def _mmap_private(host: api.Host, flags: int) -> Outcome:
    """test_mmap_cow: MAP_PRIVATE is EINVAL with MMAP (ENODEV without)."""
    with gmem_of(host, flags) as g:
        return attempt(lambda: g.mmap(TOTAL, shared=False).munmap())


@case("mmap.supported", flags=SHAREABLE)
def _mmap_supported(host: api.Host, flags: int) -> Outcome:
    """test_mmap_supported: fill 0xaa, punch page 0 -> it reads 0, refill, all 0xaa."""
    with gmem_of(host, flags) as g, g.mmap(TOTAL) as m:
        m.fill(0, TOTAL, 0xAA)
        filled = runs(m.read(0, TOTAL))
        punch = attempt(lambda: g.fallocate(uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE, 0, PAGE))
        punched = runs(m.read(0, TOTAL))
        m.fill(0, PAGE, 0xAA)
        return {
            "filled": filled,
            "punch": punch,
            "after_punch": punched,
            "refilled": runs(m.read(0, TOTAL)),
        }


def _sigbus_offset(m: api.Mapping, fn: Callable[[], object]) -> Outcome:
    """``{"result": "SIGBUS", "offset": where}`` or the result of ``fn``."""
    try:
        fn()
    except api.SigBus as e:
        return {"result": "SIGBUS", "offset": e.addr - m.addr}
    except api.KernelError as e:
        return {"result": errno_name(e)}
    return {"result": "ok"}


@case("fault.overflow", flags=SHAREABLE)
def _fault_overflow(host: api.Host, flags: int) -> Outcome:
    """test_fault_overflow: a 4x mapping; memset and a read past i_size take SIGBUS."""
    with gmem_of(host, flags) as g, g.mmap(4 * TOTAL) as m:
        return {
            "fill": _sigbus_offset(m, lambda: m.fill(0, 4 * TOTAL, 0xAA)),
            "read_past_eof": _sigbus_offset(m, lambda: m.read(TOTAL, 1)),
            "accessible": runs(m.read(0, TOTAL)),
        }


@case("fault.private", flags=PRIVATE_ONLY)
def _fault_private(host: api.Host, flags: int) -> Outcome:
    """test_fault_private: without INIT_SHARED every host fault takes SIGBUS."""
    with gmem_of(host, flags) as g, g.mmap(TOTAL) as m:
        return {
            "fill": _sigbus_offset(m, lambda: m.fill(0, TOTAL, 0xAA)),
            "read": _sigbus_offset(m, lambda: m.read(0, 1)),
        }


# --- fallocate --------------------------------------------------------------------------------
KEEP = uapi.FALLOC_FL_KEEP_SIZE
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE


@case("fallocate.sequence", flags=ALL_FLAGS)
def _fallocate_sequence(host: api.Host, flags: int) -> Outcome:
    """test_fallocate: the nine calls in order (anchors §B.1 item 7)."""
    calls = [
        (KEEP, 0, TOTAL),
        (PUNCH, PAGE - 1, PAGE),
        (KEEP, TOTAL, PAGE),
        (KEEP, TOTAL + PAGE, PAGE),
        (PUNCH, TOTAL, PAGE),
        (PUNCH, TOTAL + PAGE, PAGE),
        (PUNCH, PAGE, PAGE - 1),
        (PUNCH, PAGE, PAGE),
        (KEEP, PAGE, PAGE),
    ]
    with gmem_of(host, flags) as g:
        return [attempt(partial(g.fallocate, *c)) for c in calls]


@case("fallocate.invalid_punch_hole", flags=ALL_FLAGS)
def _fallocate_invalid_punch_hole(host: api.Host, flags: int) -> Outcome:
    """test_invalid_punch_hole: ten unaligned (offset, len) pairs."""
    pairs = [
        (0, 1), (0, PAGE - 1), (0, PAGE + 1),
        (1, 1), (1, PAGE - 1), (1, PAGE), (1, PAGE + 1),
        (PAGE, 1), (PAGE, PAGE - 1), (PAGE, PAGE + 1),
    ]  # fmt: skip
    with gmem_of(host, flags) as g:
        return [attempt(partial(g.fallocate, PUNCH, o, n)) for o, n in pairs]


@case("fallocate.modes", flags=ALL_FLAGS)
def _fallocate_modes(host: api.Host, flags: int) -> Outcome:
    """Modes other than KEEP_SIZE[|PUNCH_HOLE] are EOPNOTSUPP."""
    modes = {
        "0": 0,
        "PUNCH_HOLE": uapi.FALLOC_FL_PUNCH_HOLE,
        "KEEP_SIZE|ZERO_RANGE": KEEP | uapi.FALLOC_FL_ZERO_RANGE,
        "COLLAPSE_RANGE": uapi.FALLOC_FL_COLLAPSE_RANGE,
    }
    with gmem_of(host, flags) as g:
        return {name: attempt(partial(g.fallocate, m, 0, PAGE)) for name, m in modes.items()}


@case("fallocate.punch_refault_zero", flags=SHAREABLE)
def _fallocate_punch_refault_zero(host: api.Host, flags: int) -> Outcome:
    """Punching page 1 of a filled file: the mapping re-faults it as zeroes, the rest stays."""
    with gmem_of(host, flags) as g, g.mmap(TOTAL) as m:
        m.fill(0, TOTAL, 0x5A)
        g.fallocate(PUNCH, PAGE, PAGE)
        return runs(m.read(0, TOTAL))


@case("fallocate.preallocated_reads_zero", flags=SHAREABLE)
def _fallocate_preallocated_reads_zero(host: api.Host, flags: int) -> Outcome:
    """Folios allocated by fallocate are not zeroed yet; the fault zeroes them."""
    with gmem_of(host, flags) as g:
        g.fallocate(KEEP, 0, TOTAL)
        return host_read(g, TOTAL)


# --- memslot bindings -------------------------------------------------------------------------
BINDABLE = ALL_FLAGS


@case("bind.ok", flags=BINDABLE)
def _bind_ok(host: api.Host, flags: int) -> Outcome:
    """Bind the whole file at 4 GiB with userspace_addr=0, then delete the slot."""
    with vm_of(host) as vm, vm.create_guest_memfd(TOTAL, flags) as g:
        return {"bind": attempt(lambda: bind(vm, g, TOTAL)), "delete": attempt(lambda: unbind(vm))}


@case("bind.bad_fd", guest_memfd=True)
def _bind_bad_fd(host: api.Host, _: int) -> Outcome:
    """kvm_gmem_bind: an fd number that is not open is EBADF."""
    with vm_of(host) as vm:
        return attempt(lambda: bind(vm, BAD_FD, TOTAL))


@case("bind.not_guest_memfd", guest_memfd=True)
def _bind_not_guest_memfd(host: api.Host, _: int) -> Outcome:
    """A memfd passed as guest_memfd is EINVAL."""
    with vm_of(host) as vm, host.memfd_create() as f:
        f.ftruncate(TOTAL)
        return attempt(lambda: bind(vm, f.fileno(), TOTAL))


@case("bind.offset_unaligned", flags=(SHARED,))
def _bind_offset_unaligned(host: api.Host, flags: int) -> Outcome:
    with vm_of(host) as vm, vm.create_guest_memfd(TOTAL, flags) as g:
        return attempt(lambda: bind(vm, g, PAGE, offset=1))


@case("bind.beyond_size", flags=(SHARED,))
def _bind_beyond_size(host: api.Host, flags: int) -> Outcome:
    """offset + size > i_size is EINVAL."""
    with vm_of(host) as vm, vm.create_guest_memfd(TOTAL, flags) as g:
        return attempt(lambda: bind(vm, g, TOTAL, offset=PAGE))


@case("bind.overlapping_binding", flags=(SHARED,))
def _bind_overlapping_binding(host: api.Host, flags: int) -> Outcome:
    """A second slot over file pages already bound is EINVAL; disjoint pages are fine."""
    with vm_of(host) as vm, vm.create_guest_memfd(TOTAL, flags) as g:
        bind(vm, g, 2 * PAGE)
        return {
            "overlap": attempt(lambda: bind(vm, g, 2 * PAGE, slot=2, gpa=8 << 30, offset=PAGE)),
            "disjoint": attempt(lambda: bind(vm, g, 2 * PAGE, slot=3, gpa=12 << 30, offset=2 * PAGE)),
        }


@case("bind.overlapping_gpa", flags=(SHARED,))
def _bind_overlapping_gpa(host: api.Host, flags: int) -> Outcome:
    """A second slot over the same GPA range is EEXIST."""
    with (
        vm_of(host) as vm,
        vm.create_guest_memfd(TOTAL, flags) as a,
        vm.create_guest_memfd(TOTAL, flags) as b,
    ):
        bind(vm, a, TOTAL)
        return attempt(lambda: bind(vm, b, TOTAL, slot=2, gpa=GMEM_GPA + PAGE))


@case("bind.readonly", flags=(SHARED,))
def _bind_readonly(host: api.Host, flags: int) -> Outcome:
    """KVM_MEM_READONLY|KVM_MEM_GUEST_MEMFD is EINVAL."""
    with vm_of(host) as vm, vm.create_guest_memfd(TOTAL, flags) as g:
        ro = uapi.KVM_MEM_GUEST_MEMFD | uapi.KVM_MEM_READONLY
        return attempt(lambda: bind(vm, g, TOTAL, flags=ro))


@case("bind.other_vm", flags=(SHARED,))
def _bind_other_vm(host: api.Host, flags: int) -> Outcome:
    """A guest_memfd belongs to the VM that created it: binding it in another is EINVAL."""
    with (
        host.open_kvm() as kvm,
        kvm.create_vm() as a,
        kvm.create_vm() as b,
        a.create_guest_memfd(TOTAL, flags) as g,
    ):
        return attempt(lambda: bind(b, g, TOTAL))


@case("attributes.set_private")
def _attributes_set_private(host: api.Host, _: int) -> Outcome:
    """KVM_SET_MEMORY_ATTRIBUTES(PRIVATE) on a default VM (ENOTTY where compiled out)."""
    with vm_of(host) as vm:
        return attempt(lambda: vm.set_memory_attributes(0, 2 << 20, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE))


# --- a real guest -----------------------------------------------------------------------------
@case("guest.selftest", flags=SHAREABLE, vcpu=True)
def _guest_selftest(host: api.Host, flags: int) -> Outcome:
    """test_guest_memfd_guest: host writes 0xaa, guest checks it and writes 0xff, host sees 0xff."""
    with guest_of(host, flags) as s:
        host_fill(s.gmem, 0xAA)
        guest = run(s, GuestProgram().check(GMEM_GPA, PAGE, 0xAA).fill(GMEM_GPA, PAGE, 0xFF))
        return {"guest": guest, "host_after": host_read(s.gmem)}


@case("guest.reads_untouched_zero", flags=MAPPABLE, vcpu=True)
def _guest_reads_untouched_zero(host: api.Host, flags: int) -> Outcome:
    """N01: the guest reads a page nobody touched: kvm_gmem_get_pfn allocates a zeroed folio."""
    with guest_of(host, flags) as s:
        return run(s, GuestProgram().report(GMEM_GPA + 100))


@case("guest.host_to_guest", flags=SHAREABLE, vcpu=True)
def _guest_host_to_guest(host: api.Host, flags: int) -> Outcome:
    """N02: host writes 0x3c through the mapping, the guest reads it."""
    with guest_of(host, flags) as s:
        host_fill(s.gmem, 0x3C)
        return run(s, GuestProgram().report(GMEM_GPA))


@case("guest.guest_to_host", flags=SHAREABLE, vcpu=True)
def _guest_guest_to_host(host: api.Host, flags: int) -> Outcome:
    """N03: the guest writes 0xa5 to an untouched page, the host reads it."""
    with guest_of(host, flags) as s:
        run(s, GuestProgram().fill(GMEM_GPA, PAGE, 0xA5))
        return host_read(s.gmem)


@case("guest.host_rewrite_coherent", flags=SHAREABLE, vcpu=True)
def _guest_host_rewrite_coherent(host: api.Host, flags: int) -> Outcome:
    """N04: while the guest has the page mapped the host rewrites it; the guest sees it."""
    with guest_of(host, flags) as s, s.gmem.mmap(PAGE) as m:
        m.fill(0, PAGE, 0x11)
        first = run(s, GuestProgram().report(GMEM_GPA))
        m.fill(0, PAGE, 0x7E)
        return {"first": first, "after_rewrite": run(s, GuestProgram().report(GMEM_GPA))}


@case("guest.punch_hole_while_mapped", flags=MAPPABLE, vcpu=True)
def _guest_punch_hole_while_mapped(host: api.Host, flags: int) -> Outcome:
    """N05: punch a page the guest has mapped; the guest re-reads a fresh zeroed page."""
    with guest_of(host, flags) as s:
        first = run(s, GuestProgram().fill(GMEM_GPA, PAGE, 0x55).report(GMEM_GPA))
        punch = attempt(lambda: s.gmem.fallocate(PUNCH, 0, PAGE))
        return {
            "first": first,
            "punch": punch,
            "after_punch": run(s, GuestProgram().report(GMEM_GPA)),
        }


@case("guest.mmap_only_access", flags=PRIVATE_ONLY, vcpu=True)
def _guest_mmap_only_access(host: api.Host, flags: int) -> Outcome:
    """N10: MMAP without INIT_SHARED: the guest reads and writes; the host mapping SIGBUSes."""
    with guest_of(host, flags) as s:
        guest = run(s, GuestProgram().fill(GMEM_GPA, PAGE, 0x61).report(GMEM_GPA))
        return {"guest": guest, "host": host_read(s.gmem)}


@case("guest.no_mmap_no_hva", flags=(0, NDM), vcpu=True)
def _guest_no_mmap_no_hva(host: api.Host, flags: int) -> Outcome:
    """N12: flags 0 and userspace_addr=0: not GMEM_ONLY and no hva, so KVM_RUN fails."""
    with guest_of(host, flags) as s:
        try:
            return run(s, GuestProgram().report(GMEM_GPA))
        except api.KernelError as e:
            return {"KVM_RUN": errno_name(e)}


@case("guest.release_while_bound", flags=MAPPABLE, vcpu=True)
def _guest_release_while_bound(host: api.Host, flags: int) -> Outcome:
    """N13/N14: close the only gmem fd while bound: guest accesses exit with MEMORY_FAULT."""
    with guest_of(host, flags, size=2 * PAGE) as s:
        run(s, GuestProgram().touch(GMEM_GPA, PAGE))
        s.gmem.close()
        return {
            "mapped_page": run(s, GuestProgram().report(GMEM_GPA)),
            "unmapped_page": run(s, GuestProgram().report(GMEM_GPA + PAGE)),
            "delete_slot": attempt(lambda: unbind(s.vm)),
        }


@case("guest.rebind_keeps_contents", flags=MAPPABLE, vcpu=True)
def _guest_rebind_keeps_contents(host: api.Host, flags: int) -> Outcome:
    """N16: contents belong to the file: delete the slot, bind at another GPA, read back."""
    with guest_of(host, flags) as s:
        run(s, GuestProgram().fill(GMEM_GPA, PAGE, 0x77))
        unbind(s.vm)
        bind(s.vm, s.gmem, PAGE, gpa=UNBACKED_GPA)
        return run(s, GuestProgram().report(UNBACKED_GPA))


@case("guest.check_failure_offset", flags=SHAREABLE, vcpu=True)
def _guest_check_failure_offset(host: api.Host, flags: int) -> Outcome:
    """A Check reports the offset of the first differing byte, then the program ends."""
    with guest_of(host, flags) as s:
        with s.gmem.mmap(PAGE) as m:
            m.fill(0, PAGE, 0xAA)
            m.write(100, b"\x01")
        return run(s, GuestProgram().check(GMEM_GPA, PAGE, 0xAA).out(0x42, 1))


@case("guest.unbacked_gpa", vcpu=True)
def _guest_unbacked_gpa(host: api.Host, _: int) -> Outcome:
    """A guest load from a GPA without a memslot exits to userspace as MMIO."""
    with vm_of(host) as vm, vm.create_vcpu(0) as vcpu:
        return program_outcome(api.run_program(vcpu, GuestProgram().report(UNBACKED_GPA)))


@case("guest.mmio_insn_in_memory", vcpu=True)
def _guest_mmio_insn_in_memory(host: api.Host, _: int) -> Outcome:
    """The shape of the series' test_guest_memfd_mmio on anonymous memory: the guest writes
    ``movabs al, [UNBACKED_GPA]; ret`` into its memslot and calls it, so KVM must fetch that
    instruction through userspace_addr to emulate the MMIO read; then the VMM's data (none)."""
    with vm_of(host) as vm, host.mmap_anonymous(PAGE) as mem, vm.create_vcpu(0) as vcpu:
        vm.set_user_memory_region2(SLOT, 0, GMEM_GPA, PAGE, mem.addr, None, 0)
        vcpu.load_program(GuestProgram().report_via(UNBACKED_GPA, GMEM_GPA + PAGE // 2))
        return [exit_outcome(vcpu.run()) for _ in range(3)]


# --- kernel paths that reach user memory ------------------------------------------------------
FILL = 0x5A
PATH_LEN = 2 * PAGE
GUP_PATHS = ("proc_mem_read", "process_vm_readv", "vmsplice", "odirect_read_into")
ALL_PATHS = ("pipe_write_from", *GUP_PATHS)


def _path_outcome(host: api.Host, path: str, m: api.Mapping) -> Outcome:
    """``"ok"`` when the path moved all bytes (with the right content), else what it gave."""
    expected = bytes([FILL]) * PATH_LEN
    try:
        if path == "pipe_write_from":
            n = host.pipe_write_from(m, 0, PATH_LEN)
        elif path == "vmsplice":
            n = host.vmsplice(m, 0, PATH_LEN)
        elif path == "odirect_read_into":
            n = host.odirect_read_into(m, 0, PATH_LEN)
        else:
            reader = host.proc_mem_read if path == "proc_mem_read" else host.process_vm_readv
            data = reader(m, 0, PATH_LEN)
            return "ok" if data == expected else {"read": runs(data)}
    except api.KernelError as e:
        return errno_name(e)
    except api.SigBus:
        return "SIGBUS"
    return "ok" if n == PATH_LEN else {"moved": n}


def _gmem_path_case(path: str) -> CaseFn:
    def fn(host: api.Host, flags: int) -> Outcome:
        with gmem_of(host, flags, PATH_LEN) as g, g.mmap(PATH_LEN) as m:
            if flags & uapi.GUEST_MEMFD_FLAG_INIT_SHARED:
                m.fill(0, PATH_LEN, FILL)
            return _path_outcome(host, path, m)

    fn.__doc__ = f"{path} on a guest_memfd mapping (filled with {FILL:#x} when INIT_SHARED)."
    return fn


def _file_path_case(path: str, secret: bool) -> CaseFn:
    def fn(host: api.Host, _: int) -> Outcome:
        with secret_file(host) if secret else host.memfd_create() as f:
            f.ftruncate(PATH_LEN)
            with f.mmap(PATH_LEN) as m:
                m.fill(0, PATH_LEN, FILL)
                return _path_outcome(host, path, m)

    kind = "memfd_secret" if secret else "memfd"
    fn.__doc__ = f"{path} on a {kind} mapping: the reference for what GUP does without a direct map."
    return fn


for _path in ALL_PATHS:
    case(
        f"access.{_path}.guest_memfd",
        flags=MAPPABLE,
        direct_map_dependent=_path in GUP_PATHS,
    )(_gmem_path_case(_path))
    case(f"access.{_path}.memfd_secret")(_file_path_case(_path, secret=True))
    case(f"access.{_path}.memfd")(_file_path_case(_path, secret=False))


# --- mlock and address space: what VMMs do to guest memory besides touching it -----------------
@case("mlock.memfd_secret")
def _mlock_memfd_secret(host: api.Host, _: int) -> Outcome:
    """mlock of a memfd_secret mapping: mlock_fixup() skips it, GUP then refuses to populate
    it (EFAULT), and __mlock_posix_error_return() makes that ENOMEM, before and after a touch."""
    with secret_file(host) as f:
        f.ftruncate(2 * PAGE)
        with f.mmap(2 * PAGE) as m:
            untouched = attempt(m.mlock)
            m.fill(0, 2 * PAGE, 0x42)
            return {"untouched": untouched, "touched": attempt(m.mlock), "data": runs(m.read(0, 2 * PAGE))}


@case("mlock.memfd")
def _mlock_memfd(host: api.Host, _: int) -> Outcome:
    """mlock of a shared memfd mapping locks and populates it; the reference for the above."""
    with host.memfd_create() as f:
        f.ftruncate(2 * PAGE)
        with f.mmap(2 * PAGE) as m:
            return {"mlock": attempt(m.mlock), "data": runs(m.read(0, 2 * PAGE))}


@case("mlock.past_eof")
def _mlock_past_eof(host: api.Host, _: int) -> Outcome:
    """mlock of a memfd mapping that runs past EOF: the populate's fault there is SIGBUS,
    so GUP fails with EFAULT, and mlock with ENOMEM."""
    with host.memfd_create() as f:
        f.ftruncate(PAGE)
        with f.mmap(2 * PAGE) as m:
            return attempt(m.mlock)


@case("mmap.anonymous_sizes")
def _mmap_anonymous_sizes(host: api.Host, _: int) -> Outcome:
    """Private anonymous mmap: 1 MiB works; 2^46 and 2^50 bytes are more than any RAM
    (__vm_enough_memory, overcommit heuristic) and 2^47 more than TASK_SIZE: ENOMEM."""

    def size(n: int) -> str:
        return attempt(lambda: host.mmap_anonymous(n).munmap())

    return {"1M": size(1 << 20), "2^46": size(1 << 46), "2^47": size(1 << 47), "2^50": size(1 << 50)}


# --- memfd_secret, the reference design -------------------------------------------------------
@case("secretmem.create_flags")
def _secretmem_create_flags(host: api.Host, _: int) -> Outcome:
    """memfd_secret accepts 0 and O_CLOEXEC; any other bit is EINVAL."""

    secret_file(host).close()

    def create(flags: int) -> None:
        host.memfd_secret(flags).close()

    return {
        name: attempt(partial(create, f)) for name, f in (("0", 0), ("O_CLOEXEC", uapi.O_CLOEXEC), ("0x1", 1))
    }


@case("secretmem.flags_beyond_uint")
def _secretmem_flags_beyond_uint(host: api.Host, _: int) -> Outcome:
    """memfd_secret(unsigned int flags): all 32 bits set, and values that do not fit, are EINVAL."""
    secret_file(host).close()

    def create(flags: int) -> None:
        host.memfd_secret(flags).close()

    return {name: attempt(partial(create, f))
            for name, f in (("0xffffffff", 0xFFFF_FFFF), ("2^32", 1 << 32), ("2^70", 1 << 70), ("-1", -1))}


@case("secretmem.mappings")
def _secretmem_mappings(host: api.Host, _: int) -> Outcome:
    """MAP_PRIVATE is EINVAL; a shared mapping works up to EOF and SIGBUSes past it."""
    with secret_file(host) as f:
        f.ftruncate(PAGE)
        private = attempt(lambda: f.mmap(PAGE, shared=False).munmap())
        with f.mmap(2 * PAGE) as m:
            m.fill(0, PAGE, 0x42)
            return {
                "private": private,
                "in_bounds": runs(m.read(0, PAGE)),
                "past_eof": _sigbus_offset(m, lambda: m.read(PAGE, 1)),
            }
