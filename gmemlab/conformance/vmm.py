"""Conformance cases for the calls a VMM makes around guest memory (issue 12 item 3).

``madvise`` (a balloon's DONTNEED/REMOVE, a restore's POPULATE), ``mprotect``, ``mmap``
with PROT flags, MAP_POPULATE and MAP_FIXED, the fd calls (``dup``, ``fcntl``, ``fsync``,
``fchmod``, ``fstat``, reopening through ``/proc/self/fd``), ``sendfile``/``splice``,
``/proc/self/smaps``, the legacy ``KVM_SET_USER_MEMORY_REGION``, the pad and reserved
words, an ioctl a file does not know, and the MMIO exits of KVM's emulator.

Cases on anonymous memory, memfd and memfd_secret run live on any kernel with /dev/kvm;
the guest_memfd ones are held to outcomes derived from the kernel source where the
running kernel has no guest_memfd (``recorded.py`` says which).  Registered into
:data:`gmemlab.conformance.cases.CASES` on import (``gmemlab.conformance`` imports it).

Anonymous mappings are only ever written (never read first) before their smaps Rss is
compared: the kernel maps the shared zero page on a read fault, which Rss does not count,
and the model has no zero page.  The model never merges VMAs, so the cases that look at
VMAs use file mappings, which cannot merge with the test process's own memory.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from gmemlab import api, uapi
from gmemlab.conformance.cases import (
    ALL_FLAGS,
    MAPPABLE,
    PAGE,
    Outcome,
    attempt,
    case,
    errno_name,
    gmem_of,
    program_outcome,
    runs,
    secret_file,
    vm_of,
)
from gmemlab.guest import GuestProgram

N = 4  # pages in every mapping below
SIZE = N * PAGE
GPA = 1 << 30
NO_SUCH_IOCTL = 0xAEFF  # _IO(KVMIO, 0xff): no KVM file knows it
ADVICE = {"DONTNEED": uapi.MADV_DONTNEED, "REMOVE": uapi.MADV_REMOVE,
          "POPULATE_READ": uapi.MADV_POPULATE_READ, "POPULATE_WRITE": uapi.MADV_POPULATE_WRITE}


def maps_outcome(host: api.Host, m: api.Mapping) -> Outcome:
    """The smaps entries in the mapping's range, addresses relative to its start."""
    return [{"at": e.start - m.addr, "len": e.end - e.start, "perms": e.perms,
             "offset": e.offset, "path": e.path, "rss_kb": e.rss_kb, "flags": list(e.flags)}
            for e in host.maps(m)]


def byte_at(m: api.Mapping, offset: int) -> Outcome:
    """The byte at ``offset`` as hex, or the signal the read took."""
    try:
        return f"{m.read(offset, 1)[0]:02x}"
    except api.SigBus:
        return "SIGBUS"
    except api.SigSegv:
        return "SIGSEGV"


def filled_memfd(host: api.Host, value: int = 0x22, size: int = SIZE) -> api.MemFile:
    f = host.memfd_create()
    f.ftruncate(size)
    with f.mmap(size) as m:
        m.fill(0, size, value)
    return f


# --- madvise ------------------------------------------------------------------------------------
@case("madvise.anonymous")
def _madvise_anonymous(host: api.Host, _: int) -> Outcome:
    """A balloon on anonymous memory: DONTNEED drops a page (it reads back zero), REMOVE
    is EINVAL (no file), both POPULATEs work; an unknown advice and an unaligned start are
    EINVAL, an empty range is 0."""
    with host.mmap_anonymous(SIZE) as m:
        m.fill(0, SIZE, 0x11)
        out: dict[str, Outcome] = {name: attempt(partial(m.madvise, a, PAGE, PAGE))
                                   for name, a in ADVICE.items()}
        out["data"] = runs(m.read(0, SIZE))
        out["unknown_advice"] = attempt(lambda: m.madvise(999))
        out["unaligned"] = attempt(lambda: m.madvise(uapi.MADV_DONTNEED, 1, PAGE))
        out["empty"] = attempt(lambda: m.madvise(uapi.MADV_DONTNEED, PAGE, 0))
        return out


@case("madvise.memfd")
def _madvise_memfd(host: api.Host, _: int) -> Outcome:
    """On a shared memfd, DONTNEED keeps the page cache (the data comes back), REMOVE
    punches a hole (zeros, and st_blocks drops by 8); POPULATE past EOF is EFAULT (the
    fault's SIGBUS), within it fine."""
    with filled_memfd(host) as f, f.mmap(SIZE + PAGE) as m:
        blocks = f.fstat().st_blocks
        out: dict[str, Outcome] = {
            "DONTNEED": attempt(lambda: m.madvise(uapi.MADV_DONTNEED, 0, PAGE)),
            "REMOVE": attempt(lambda: m.madvise(uapi.MADV_REMOVE, PAGE, PAGE)),
            "blocks_dropped": blocks - f.fstat().st_blocks,
            # shmem fills a hole on a read fault too: the page (and its 8 blocks) comes back
            "data": runs(m.read(0, SIZE)),
            "blocks_refaulted": blocks - f.fstat().st_blocks,
        }
        for name in ("POPULATE_READ", "POPULATE_WRITE"):
            out[name] = attempt(partial(m.madvise, ADVICE[name], 0, SIZE))
            out[name + "_past_eof"] = attempt(partial(m.madvise, ADVICE[name]))
        return out


@case("madvise.memfd_secret")
def _madvise_memfd_secret(host: api.Host, _: int) -> Outcome:
    """memfd_secret refuses all four: its VMA is VM_LOCKED (DONTNEED, REMOVE: EINVAL) and
    GUP's check_vma_flags() refuses it (POPULATE: EINVAL)."""
    with secret_file(host) as f:
        f.ftruncate(SIZE)
        with f.mmap(SIZE) as m:
            m.fill(0, SIZE, 0x42)
            out: dict[str, Outcome] = {name: attempt(partial(m.madvise, a))
                                       for name, a in ADVICE.items()}
            out["data"] = runs(m.read(0, SIZE))
            return out


@case("madvise.mlocked")
def _madvise_mlocked(host: api.Host, _: int) -> Outcome:
    """After mlock a memfd mapping is VM_LOCKED: DONTNEED and REMOVE are EINVAL."""
    with filled_memfd(host) as f, f.mmap(SIZE) as m:
        m.mlock()
        return {"DONTNEED": attempt(lambda: m.madvise(uapi.MADV_DONTNEED)),
                "REMOVE": attempt(lambda: m.madvise(uapi.MADV_REMOVE)),
                "data": runs(m.read(0, SIZE))}


@case("madvise.guest_memfd", flags=MAPPABLE)
def _madvise_guest_memfd(host: api.Host, flags: int) -> Outcome:
    """A balloon on guest_memfd: DONTNEED drops the PTE and the page cache keeps the data;
    REMOVE goes through vfs_fallocate(PUNCH_HOLE|KEEP_SIZE) to kvm_gmem_fallocate(), so
    the page reads zero after."""
    with gmem_of(host, flags) as g, g.mmap(SIZE) as m:
        shared = bool(flags & uapi.GUEST_MEMFD_FLAG_INIT_SHARED)
        if shared:
            m.fill(0, SIZE, 0xAA)
        return {"DONTNEED": attempt(lambda: m.madvise(uapi.MADV_DONTNEED, 0, PAGE)),
                "REMOVE": attempt(lambda: m.madvise(uapi.MADV_REMOVE, PAGE, PAGE)),
                "data": runs(m.read(0, SIZE)) if shared else byte_at(m, 0)}


def _populate_outcome(m: api.Mapping) -> Outcome:
    return {"POPULATE_READ": attempt(lambda: m.madvise(uapi.MADV_POPULATE_READ)),
            "POPULATE_WRITE": attempt(lambda: m.madvise(uapi.MADV_POPULATE_WRITE))}


@case("populate.guest_memfd", flags=MAPPABLE, direct_map_dependent=True)
def _populate_guest_memfd(host: api.Host, flags: int) -> Outcome:
    """MADV_POPULATE_* on guest_memfd (a snapshot restore): fine with INIT_SHARED, EFAULT
    without (the fault's SIGBUS); with NO_DIRECT_MAP, GUP refuses the VMA: EINVAL."""
    with gmem_of(host, flags) as g, g.mmap(SIZE) as m:
        return _populate_outcome(m)


@case("populate.memfd_secret")
def _populate_memfd_secret(host: api.Host, _: int) -> Outcome:
    """MADV_POPULATE_* on memfd_secret: check_vma_flags() refuses it, EINVAL."""
    with secret_file(host) as f:
        f.ftruncate(SIZE)
        with f.mmap(SIZE) as m:
            return _populate_outcome(m)


@case("populate.memfd")
def _populate_memfd(host: api.Host, _: int) -> Outcome:
    """MADV_POPULATE_* on a memfd: both work."""
    with filled_memfd(host) as f, f.mmap(SIZE) as m:
        return _populate_outcome(m)


def _map_populate(host: api.Host, f: api.MemFile) -> Outcome:
    with f.mmap(SIZE, populate=True) as m:
        return {"rss_kb": [e.rss_kb for e in host.maps(m)], "blocks": f.fstat().st_blocks}


@case("map_populate.guest_memfd", flags=MAPPABLE, direct_map_dependent=True)
def _map_populate_guest_memfd(host: api.Host, flags: int) -> Outcome:
    """mmap(MAP_POPULATE) never fails for what it cannot populate (__mm_populate ignores
    errors): a guest_memfd with INIT_SHARED comes back fully mapped, one without (SIGBUS)
    or with NO_DIRECT_MAP (GUP refused) with nothing mapped."""
    with gmem_of(host, flags) as g:
        return _map_populate(host, g)


@case("map_populate.memfd_secret")
def _map_populate_memfd_secret(host: api.Host, _: int) -> Outcome:
    """mmap(MAP_POPULATE) of memfd_secret succeeds and maps nothing."""
    with secret_file(host) as f:
        f.ftruncate(SIZE)
        return _map_populate(host, f)


@case("map_populate.memfd")
def _map_populate_memfd(host: api.Host, _: int) -> Outcome:
    """mmap(MAP_POPULATE) of a memfd maps every page (and allocates it: st_blocks)."""
    with host.memfd_create() as f:
        f.ftruncate(SIZE)
        return _map_populate(host, f)


# --- mprotect and mmap's PROT flags ------------------------------------------------------------
@case("mprotect.memfd")
def _mprotect_memfd(host: api.Host, _: int) -> Outcome:
    """mprotect of the middle page splits the VMA in three; a write there is SIGSEGV, a read
    fine; PROT_NONE makes reads SIGSEGV too; an unknown PROT bit or an unaligned start is
    EINVAL, PROT_EXEC is allowed on a memfd."""
    with filled_memfd(host) as f, f.mmap(3 * PAGE) as m:
        ro = attempt(lambda: m.mprotect(uapi.PROT_READ, PAGE, PAGE))
        out: dict[str, Outcome] = {
            "PROT_READ": ro, "maps": maps_outcome(host, m),
            "write_ro": attempt(lambda: m.write(PAGE, b"x")), "read_ro": byte_at(m, PAGE),
            "write_rw": attempt(lambda: m.write(2 * PAGE, b"\x33")),
            "PROT_NONE": attempt(lambda: m.mprotect(uapi.PROT_NONE, 0, PAGE)),
            "read_none": byte_at(m, 0),
            "bad_bit": attempt(lambda: m.mprotect(0x10)),
            "unaligned": attempt(lambda: m.mprotect(uapi.PROT_READ, 1, PAGE)),
            "PROT_EXEC": attempt(lambda: m.mprotect(uapi.PROT_READ | uapi.PROT_EXEC, 2 * PAGE)),
        }
        out["perms_after"] = [e.perms for e in host.maps(m)]
        return out


@case("mprotect.anonymous")
def _mprotect_anonymous(host: api.Host, _: int) -> Outcome:
    """mmap(PROT_READ) of anonymous memory: reads work, writes are SIGSEGV until mprotect
    adds PROT_WRITE; PROT_NONE memory cannot be populated (EINVAL)."""
    with host.mmap_anonymous(SIZE, prot=uapi.PROT_READ) as m:
        out: dict[str, Outcome] = {"write": attempt(lambda: m.write(0, b"x")),
                                   "read": byte_at(m, 0)}
        out["PROT_RW"] = attempt(lambda: m.mprotect(uapi.PROT_RW))
        out["write_after"] = attempt(lambda: m.write(0, b"\x44"))
        out["read_after"] = byte_at(m, 0)
        m.mprotect(uapi.PROT_NONE)
        out["populate_none"] = attempt(lambda: m.madvise(uapi.MADV_POPULATE_READ))
        return out


@case("mprotect.memslot", vcpu=True)
def _mprotect_memslot(host: api.Host, _: int) -> Outcome:
    """mprotect of the memory behind a plain memslot: change_protection() tells KVM (its mmu
    notifier zaps the range), so the guest's next access faults again and hva_to_pfn()'s
    GUP decides: a store to PROT_READ memory, or any access to PROT_NONE memory, fails
    KVM_RUN with EFAULT; a load from PROT_READ memory works."""
    with vm_of(host) as vm, host.mmap_anonymous(PAGE) as mem, vm.create_vcpu(0) as vcpu:
        mem.fill(0, PAGE, 1)
        vm.set_user_memory_region(1, 0, GPA, PAGE, mem.addr)

        def go(p: GuestProgram) -> Outcome:
            try:
                return program_outcome(api.run_program(vcpu, p))
            except api.KernelError as e:
                return errno_name(e)

        out: dict[str, Outcome] = {"store": go(GuestProgram().fill(GPA, PAGE, 7))}
        mem.mprotect(uapi.PROT_READ)
        out["store_ro"] = go(GuestProgram().fill(GPA, 1, 8))
        out["load_ro"] = go(GuestProgram().report(GPA))
        mem.mprotect(uapi.PROT_NONE)
        out["load_none"] = go(GuestProgram().report(GPA))
        mem.mprotect(uapi.PROT_RW)
        out["memory"] = runs(mem.read(0, PAGE))
        return out


@case("mmap.exec")
def _mmap_exec(host: api.Host, _: int) -> Outcome:
    """PROT_EXEC: fine on a memfd; memfd_secret's mount is noexec, so mmap is EPERM and
    mprotect(PROT_EXEC) of a mapping of it EACCES (VM_MAYEXEC cleared)."""
    with filled_memfd(host) as f, secret_file(host) as s:
        s.ftruncate(PAGE)
        with s.mmap(PAGE) as sm:
            rx = uapi.PROT_READ | uapi.PROT_EXEC
            return {"memfd": attempt(lambda: f.mmap(PAGE, prot=rx).munmap()),
                    "memfd_secret": attempt(lambda: s.mmap(PAGE, prot=rx).munmap()),
                    "mprotect_secret": attempt(lambda: sm.mprotect(rx)),
                    "secret_maps": maps_outcome(host, sm)}


@case("mmap.guest_memfd_prot", flags=MAPPABLE)
def _mmap_guest_memfd_prot(host: api.Host, flags: int) -> Outcome:
    """guest_memfd's own filesystem is SB_I_NOEXEC: PROT_EXEC is EPERM, mprotect to it
    EACCES; a PROT_READ mapping takes SIGSEGV on a write (before any fault, so even
    without INIT_SHARED); smaps shows the file as "/[kvm-gmem] (deleted)"."""
    with gmem_of(host, flags) as g:
        exec_ = attempt(lambda: g.mmap(PAGE, prot=uapi.PROT_READ | uapi.PROT_EXEC).munmap())
        with g.mmap(SIZE, prot=uapi.PROT_READ) as ro, g.mmap(SIZE) as rw:
            return {"PROT_EXEC": exec_,
                    "write_ro": attempt(lambda: ro.write(0, b"x")),
                    "read_ro": byte_at(ro, 0),
                    "mprotect_exec": attempt(lambda: rw.mprotect(uapi.PROT_READ | uapi.PROT_EXEC)),
                    "maps": maps_outcome(host, rw)}


@case("mmap.private_cow")
def _mmap_private_cow(host: api.Host, _: int) -> Outcome:
    """MAP_PRIVATE of a memfd: a store copies the page (wp_page_copy()), the file never
    sees it; a later store through a shared mapping is not seen by the copy; MADV_DONTNEED
    drops the copy, and the page cache shows through again."""
    with filled_memfd(host, 0x11, PAGE) as f, f.mmap(PAGE, shared=False) as priv, \
            f.mmap(PAGE) as shared:
        priv.write(0, b"\x66")
        out: dict[str, Outcome] = {"private": byte_at(priv, 0), "file": byte_at(shared, 0)}
        shared.write(1, b"\x77")
        out["private_after_shared_store"] = runs(priv.read(0, 2))
        priv.madvise(uapi.MADV_DONTNEED)
        out["private_after_dontneed"] = runs(priv.read(0, 2))
        return out


# --- MAP_FIXED ----------------------------------------------------------------------------------
@case("mmap.fixed")
def _mmap_fixed(host: api.Host, _: int) -> Outcome:
    """MAP_FIXED of a memfd page over anonymous memory replaces that page only; a MAP_FIXED
    whose ->mmap fails (MAP_PRIVATE of memfd_secret) has already cleared the old page: it
    stays unmapped (SIGSEGV), and madvise/mprotect over the hole are ENOMEM."""
    with filled_memfd(host) as f, secret_file(host) as s, host.mmap_anonymous(SIZE) as a:
        s.ftruncate(PAGE)
        a.fill(0, SIZE, 0x33)
        new = f.mmap(PAGE, fixed=a)
        out: dict[str, Outcome] = {"same_address": new.addr == a.addr,
                                   "replaced": byte_at(a, 0), "kept": byte_at(a, PAGE),
                                   "paths": [e.path for e in host.maps(a)][:1]}
        out["failed"] = attempt(lambda: s.mmap(PAGE, shared=False, fixed=a))
        out["after_failed"] = byte_at(a, 0)
        out["rest"] = byte_at(a, PAGE)
        out["madvise_hole"] = attempt(lambda: a.madvise(uapi.MADV_DONTNEED))
        out["mprotect_hole"] = attempt(lambda: a.mprotect(uapi.PROT_READ))
        return out


# --- fd calls -----------------------------------------------------------------------------------
def _fd_outcome(f: api.MemFile) -> Outcome:
    st = f.fstat()
    out: dict[str, Outcome] = {
        "F_GETFL": f.fcntl(uapi.F_GETFL), "F_GETFD": f.fcntl(uapi.F_GETFD),
        "F_GET_SEALS": attempt(lambda: f.fcntl(uapi.F_GET_SEALS)),
        "F_ADD_SEALS": attempt(lambda: f.fcntl(uapi.F_ADD_SEALS, uapi.F_SEAL_GROW)),
        "F_SETFL_O_DIRECT": attempt(lambda: f.fcntl(uapi.F_SETFL, uapi.O_DIRECT)),
        "F_SETFL_NONBLOCK": attempt(lambda: f.fcntl(uapi.F_SETFL, uapi.O_NONBLOCK | uapi.O_APPEND)),
        "unknown_cmd": attempt(lambda: f.fcntl(9999)),
        "fsync": attempt(f.fsync), "fdatasync": attempt(f.fdatasync),
        "fchmod": attempt(lambda: f.fchmod(0o640)),
        "st_mode": oct(f.fstat().st_mode), "st_nlink": st.st_nlink, "st_blocks": st.st_blocks,
        "st_size": st.st_size,
        "ioctl_kvm": attempt(lambda: f.ioctl(uapi.KVM_CREATE_VCPU)),
        "dup_minfd_huge": attempt(lambda: f.dup(1 << 31).close()),
    }
    out["F_GETFL_after"] = f.fcntl(uapi.F_GETFL)
    with f.dup() as d, f.dup(cloexec=True) as dc:
        out["dup"] = {"F_GETFD": d.fcntl(uapi.F_GETFD), "cloexec": dc.fcntl(uapi.F_GETFD),
                      "same_inode": d.fstat().st_ino == st.st_ino,
                      "shares_flags": d.fcntl(uapi.F_GETFL) == out["F_GETFL_after"]}
    return out


@case("fd.memfd")
def _fd_memfd(host: api.Host, _: int) -> Outcome:
    """fcntl/fsync/fchmod/fstat/dup on a memfd (MFD_CLOEXEC, no MFD_ALLOW_SEALING: the file
    carries F_SEAL_SEAL, so adding a seal is EPERM); O_DIRECT cannot be set (no ->open ran
    to give it FMODE_CAN_ODIRECT); st_nlink is 0, st_blocks counts its pages."""
    with filled_memfd(host, size=2 * PAGE) as f:
        return _fd_outcome(f)


@case("fd.memfd_secret")
def _fd_memfd_secret(host: api.Host, _: int) -> Outcome:
    """The same on memfd_secret: no seals, no ->fsync (EINVAL), fchmod works
    (simple_setattr), st_blocks stays 0."""
    with secret_file(host) as f:
        f.ftruncate(2 * PAGE)
        return _fd_outcome(f)


@case("fd.guest_memfd", flags=ALL_FLAGS)
def _fd_guest_memfd(host: api.Host, flags: int) -> Outcome:
    """The same on guest_memfd: O_RDWR|O_LARGEFILE, no close-on-exec (get_unused_fd_flags(0)),
    no seals, no ->fsync, kvm_gmem_setattr() refuses fchmod (EINVAL), no ->unlocked_ioctl."""
    with gmem_of(host, flags) as g:
        return _fd_outcome(g)


def _reopen_outcome(f: api.MemFile) -> Outcome:
    try:
        g = f.reopen()
    except api.KernelError as e:
        return errno_name(e)
    with g:
        return {"same_inode": g.fstat().st_ino == f.fstat().st_ino,
                "F_GETFL": g.fcntl(uapi.F_GETFL), "F_GETFD": g.fcntl(uapi.F_GETFD)}


@case("reopen.memfd")
def _reopen_memfd(host: api.Host, _: int) -> Outcome:
    """open("/proc/self/fd/N") of a memfd opens its shmem inode again: data written through
    the new file's mapping is in the old one's; O_RDONLY then refuses a writable shared
    mapping (EACCES)."""
    with filled_memfd(host) as f:
        out: dict[str, Outcome] = {"reopen": _reopen_outcome(f)}
        with f.reopen() as g, g.mmap(PAGE) as m, f.mmap(PAGE) as old:
            m.write(0, b"\x5e")
            out["shared_data"] = byte_at(old, 0)
        with f.reopen(uapi.O_RDONLY) as r:
            out["rdonly_rw_map"] = attempt(lambda: r.mmap(PAGE).munmap())
            out["rdonly_ro_map"] = attempt(lambda: r.mmap(PAGE, prot=uapi.PROT_READ).munmap())
        return out


@case("reopen.memfd_secret")
def _reopen_memfd_secret(host: api.Host, _: int) -> Outcome:
    """memfd_secret's anonymous inode keeps no_open_fops: reopening is ENXIO."""
    with secret_file(host) as f:
        return _reopen_outcome(f)


@case("reopen.guest_memfd", flags=ALL_FLAGS)
def _reopen_guest_memfd(host: api.Host, flags: int) -> Outcome:
    """guest_memfd's inode (alloc_anon_secure_inode() on kvm_gmem_fs) keeps no_open_fops:
    ENXIO, so /proc/self/fd cannot hand the guest's memory to anyone with another mode."""
    with gmem_of(host, flags) as g:
        return _reopen_outcome(g)


# --- sendfile / splice --------------------------------------------------------------------------
def _splice_outcome(host: api.Host, f: api.MemFile, memfd: api.MemFile) -> Outcome:
    return {
        "sendfile_from": attempt(lambda: host.sendfile(memfd, f, PAGE)),
        "sendfile_from_offset": attempt(lambda: host.sendfile(memfd, f, PAGE, 0)),
        "sendfile_to": attempt(lambda: host.sendfile(f, memfd, PAGE, 0)),
        "splice_to_pipe": attempt(lambda: host.splice_to_pipe(f, PAGE)),
        "splice_to_pipe_offset": attempt(lambda: host.splice_to_pipe(f, PAGE, 0)),
        "splice_from_pipe": attempt(lambda: host.splice_from_pipe(f, b"\x01" * 8)),
        "splice_from_pipe_offset": attempt(lambda: host.splice_from_pipe(f, b"\x01" * 8, 0)),
    }


@case("splice.memfd")
def _splice_memfd(host: api.Host, _: int) -> Outcome:
    """sendfile and splice move a memfd's bytes (shmem has ->splice_read/->splice_write)."""
    with filled_memfd(host, 0x22, 2 * PAGE) as f, host.memfd_create() as out:
        sent = host.sendfile(out, f, 3 * PAGE, PAGE)
        piped = host.splice_to_pipe(out, 16, 8)
        put = host.splice_from_pipe(out, b"\x07" * 8, 0)
        with out.mmap(PAGE) as m:
            return {"sendfile": sent, "out_size": out.fstat().st_size,
                    "splice_to_pipe": runs(piped), "splice_from_pipe": put,
                    "out_data": runs(m.read(0, 16))}


@case("splice.memfd_secret")
def _splice_memfd_secret(host: api.Host, _: int) -> Outcome:
    """memfd_secret has no ->splice_read/->splice_write (EINVAL) and no FMODE_PREAD (an
    offset on it is ESPIPE for sendfile and splice to a pipe; EINVAL from a pipe)."""
    with secret_file(host) as f, filled_memfd(host) as memfd:
        f.ftruncate(PAGE)
        return _splice_outcome(host, f, memfd)


@case("splice.guest_memfd", flags=ALL_FLAGS)
def _splice_guest_memfd(host: api.Host, flags: int) -> Outcome:
    """guest_memfd likewise: kvm_gmem_fops has no read_iter/splice_read/splice_write, so the
    guest's memory cannot leave through sendfile or splice whatever its flags."""
    with gmem_of(host, flags) as g, filled_memfd(host) as memfd:
        return _splice_outcome(host, g, memfd)


# --- ioctls the file does not know --------------------------------------------------------------
@case("ioctl.unknown", vcpu=True)
def _ioctl_unknown(host: api.Host, _: int) -> Outcome:
    """A request nobody implements: /dev/kvm and a vCPU answer EINVAL (x86's
    kvm_arch_dev_ioctl()/kvm_arch_vcpu_ioctl() default), a VM ENOTTY
    (kvm_arch_vm_ioctl()); a KVM ioctl on a memfd or memfd_secret is ENOTTY (no
    ->unlocked_ioctl); FIOCLEX works on any fd (do_vfs_ioctl())."""
    with host.open_kvm() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu, \
            host.memfd_create() as f, secret_file(host) as s:
        out: dict[str, Outcome] = {
            "kvm": attempt(lambda: kvm.ioctl(NO_SUCH_IOCTL)),
            "vm": attempt(lambda: vm.ioctl(NO_SUCH_IOCTL)),
            "vcpu": attempt(lambda: vcpu.ioctl(NO_SUCH_IOCTL)),
            "vcpu_other_type": attempt(lambda: vcpu.ioctl(0x1234)),
            "memfd_kvm_run": attempt(lambda: f.ioctl(uapi.KVM_RUN)),
            "secret_create_vm": attempt(lambda: s.ioctl(uapi.KVM_CREATE_VM)),
        }
        s.ioctl(uapi.FIOCLEX)
        out["FIOCLEX"] = s.fcntl(uapi.F_GETFD)
        return out


@case("ioctl.guest_memfd", flags=(0, uapi.GUEST_MEMFD_FLAG_MMAP))
def _ioctl_guest_memfd(host: api.Host, flags: int) -> Outcome:
    """KVM ioctls on a guest_memfd are ENOTTY: kvm_gmem_fops has no ->unlocked_ioctl."""
    with gmem_of(host, flags) as g:
        return {"KVM_RUN": attempt(lambda: g.ioctl(uapi.KVM_RUN)),
                "KVM_CREATE_GUEST_MEMFD": attempt(lambda: g.ioctl(uapi.KVM_CREATE_GUEST_MEMFD))}


# --- memslots: the legacy ioctl, pads and reserved words ----------------------------------------
@case("memslot.legacy", vcpu=True)
def _memslot_legacy(host: api.Host, _: int) -> Outcome:
    """KVM_SET_USER_MEMORY_REGION takes LOG_DIRTY_PAGES and READONLY only (guest_memfd's
    flag, any other bit: EINVAL, whatever the kernel's guest_memfd support); a guest reads
    through a slot made with it; REGION2's pad words are never looked at."""
    with vm_of(host) as vm, host.mmap_anonymous(SIZE) as mem:
        mem.fill(0, SIZE, 0x3C)

        def legacy(slot: int, flags: int, gpa: int) -> Callable[[], None]:
            return lambda: vm.set_user_memory_region(slot, flags, gpa, PAGE, mem.addr)

        out: dict[str, Outcome] = {
            "GUEST_MEMFD": attempt(legacy(1, uapi.KVM_MEM_GUEST_MEMFD, GPA)),
            "bit3": attempt(legacy(1, 1 << 3, GPA)),
            "READONLY": attempt(legacy(2, uapi.KVM_MEM_READONLY, GPA + PAGE)),
            "LOG_DIRTY_PAGES": attempt(legacy(3, uapi.KVM_MEM_LOG_DIRTY_PAGES, GPA + 2 * PAGE)),
            "plain": attempt(legacy(1, 0, GPA)),
            "region2_pads": attempt(lambda: vm.set_user_memory_region2(
                4, 0, GPA + 3 * PAGE, PAGE, mem.addr + 3 * PAGE, pad1=1, pad2=[1] * 14)),
        }
        with vm.create_vcpu(0) as vcpu:
            out["guest"] = program_outcome(api.run_program(vcpu, GuestProgram().report(GPA)))
        return out


@case("create.reserved", guest_memfd=True)
def _create_reserved(host: api.Host, _: int) -> Outcome:
    """kvm_gmem_create() never reads kvm_create_guest_memfd.reserved: nonzero words are
    accepted (nothing in the posted series checks them)."""
    with vm_of(host) as vm:
        return attempt(lambda: vm.create_guest_memfd(PAGE, 0, reserved=[1] * 6).close())


# --- the emulator's MMIO exits ------------------------------------------------------------------
@case("guest.mmio", vcpu=True)
def _guest_mmio(host: api.Host, _: int) -> Outcome:
    """KVM's emulator: a write to a GPA without a memslot, and a write to a READONLY slot,
    exit to userspace as MMIO writes (the slot's memory unchanged); a read of the READONLY
    slot is ordinary memory."""
    with vm_of(host) as vm, host.mmap_anonymous(PAGE) as mem:
        mem.fill(0, PAGE, 0x5A)
        vm.set_user_memory_region(1, uapi.KVM_MEM_READONLY, GPA, PAGE, mem.addr)
        with vm.create_vcpu(0) as vcpu:
            def go(p: GuestProgram) -> Outcome:
                return program_outcome(api.run_program(vcpu, p))

            return {"unbacked_write": go(GuestProgram().fill(2 * GPA, 1, 0x77)),
                    "readonly_read": go(GuestProgram().report(GPA)),
                    "readonly_write": go(GuestProgram().fill(GPA, 1, 0xEE)),
                    "memory": runs(mem.read(0, PAGE))}

