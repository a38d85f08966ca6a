"""TwinHost and its mappings: child-process accesses, SIGBUS reporting, kernel access paths."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest

from gmemlab import api, twin
from gmemlab.twin import _sys
from gmemlab.twin import host as twin_host
from gmemlab.twin.child import run_in_child

PAGE = 4096


def test_missing_kvm_is_reported_by_name() -> None:
    with pytest.raises(twin.TwinUnavailable, match="/nonexistent/kvm"):
        twin.TwinHost(kvm_path="/nonexistent/kvm").open_kvm()


def test_available_gives_a_reason() -> None:
    ok, reason = twin.available()
    assert isinstance(ok, bool)
    assert reason


def test_meminfo_parsing(tmp_path: Path) -> None:
    f = tmp_path / "meminfo"
    f.write_text("MemTotal: 10 kB\nDirectMap4k:  110592 kB\nDirectMap2M: 1986560 kB\n")
    assert twin_host.read_direct_map(str(f)) == api.DirectMapCounters(110592, 1986560, 0)


def test_meminfo_of_this_machine() -> None:
    c = twin.TwinHost().meminfo()
    assert c.direct_map_4k + c.direct_map_2m + c.direct_map_1g > 0


def test_anonymous_mapping_in_process() -> None:
    with twin.TwinHost().mmap_anonymous(2 * PAGE) as m:
        m.fill(0, 2 * PAGE, 0x11)
        m.write(10, b"abc")
        assert m.read(9, 5) == b"\x11abc\x11"
        with pytest.raises(ValueError):
            m.read(2 * PAGE - 1, 2)
    assert not m.mapped
    m.munmap()  # idempotent
    with pytest.raises(ValueError):
        m.read(0, 1)


def test_memfd_accesses_go_through_a_child() -> None:
    h = twin.TwinHost()
    with h.memfd_create() as f:
        f.ftruncate(2 * PAGE)
        with f.mmap(3 * PAGE) as m:
            m.fill(0, 2 * PAGE, 0x22)
            m.write(PAGE - 1, b"xy")  # crosses a page boundary
            assert m.read(PAGE - 2, 4) == b"\x22xy\x22"
            assert m.read_in_process(PAGE - 1, 2) == b"xy"
            with pytest.raises(api.SigBus) as e:
                m.fill(PAGE, 2 * PAGE, 0x33)  # the third page is past EOF
            assert e.value.addr == m.addr + 2 * PAGE
            assert m.read(PAGE, 1) == b"\x33"  # the child wrote up to the fault


def test_child_reports_errno_and_other_crashes() -> None:
    def fail(_: object) -> bytes:
        raise api.KernelError(errno.EPERM, "inner")

    with pytest.raises(api.KernelError) as e:
        run_in_child(fail, "outer")
    assert e.value.errno == errno.EPERM
    assert e.value.what == "inner"

    def segv(_: object) -> bytes:
        os.kill(os.getpid(), signal.SIGSEGV)
        return b""

    with pytest.raises(api.SigSegv):  # an access the protection refused
        run_in_child(segv, "segv")

    def crash(_: object) -> bytes:
        os.kill(os.getpid(), signal.SIGABRT)
        return b""

    with pytest.raises(RuntimeError, match="SIGABRT"):
        run_in_child(crash, "crash")

    def bug(_: object) -> bytes:
        raise ZeroDivisionError

    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        run_in_child(bug, "bug")


def test_memfd_secret_paths() -> None:
    """realkernel.md §2: copy_from_user works on secretmem, the GUP paths do not."""
    h = twin.TwinHost()
    with h.memfd_secret() as f:
        f.ftruncate(PAGE)
        with f.mmap(PAGE) as m:
            m.fill(0, PAGE, 0x42)
            assert h.pipe_write_from(m, 0, PAGE) == PAGE
            for path, err in (
                (h.proc_mem_read, errno.EIO),
                (h.process_vm_readv, errno.EFAULT),
                (h.vmsplice, errno.EFAULT),
                (h.odirect_read_into, errno.EFAULT),
            ):
                with pytest.raises(api.KernelError) as e:
                    path(m, 0, PAGE)
                assert e.value.errno == err, path


def test_paths_on_anonymous_memory_move_all_bytes() -> None:
    h = twin.TwinHost()
    size = 5 * 16 * PAGE  # several pipe-sized chunks
    with h.mmap_anonymous(size) as m:
        m.fill(0, size, 0x5A)
        assert h.pipe_write_from(m, 0, size) == size
        assert h.vmsplice(m, 0, size) == size
        assert h.proc_mem_read(m, PAGE, 3) == b"ZZZ"
        assert h.process_vm_readv(m, 0, PAGE) == b"Z" * PAGE
        assert h.odirect_read_into(m, PAGE, 2 * PAGE) == 2 * PAGE
        assert m.read(PAGE, 2 * PAGE) == bytes([twin_host.ODIRECT_FILE_BYTE]) * 2 * PAGE
        assert m.read(0, 1) == b"Z"
        with pytest.raises(ValueError):
            h.odirect_read_into(m, 1, PAGE)


def test_pipe_write_stops_at_a_short_transfer() -> None:
    """A range running past EOF: write(2) copies up to the fault and returns that count."""
    h = twin.TwinHost()
    with h.memfd_create() as f:
        f.ftruncate(PAGE)
        with f.mmap(2 * PAGE) as m:
            assert h.pipe_write_from(m, 0, 2 * PAGE) == PAGE


def test_odirect_dir_rejects_tmpfs() -> None:
    if _sys.statfs_type("/dev/shm") != 0x01021994:
        pytest.skip("/dev/shm is not tmpfs here")
    assert "tmpfs" in (twin_host._odirect_problem("/dev/shm") or "")
    assert twin_host._odirect_problem("/nonexistent-dir") is not None


def test_memfd_secret_flags_pass_through() -> None:
    with pytest.raises(api.KernelError) as e:
        twin.TwinHost().memfd_secret(1)
    assert e.value.errno == errno.EINVAL
    assert "memfd_secret" in str(e.value)
