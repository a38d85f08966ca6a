"""KVM binary statistics (``KVM_GET_STATS_FD``) of a VM or vCPU.

The layout is read once (header, then descriptors each followed by a
``name_size``-byte name); every :meth:`BinaryStats.read` is one ``pread(2)`` of
the data block.  Only scalar statistics (``size == 1``) are returned;
histograms are left out.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from gmemlab import uapi
from gmemlab.twin import _sys


@dataclass(slots=True, eq=False)
class BinaryStats(_sys.FdOwner):
    _data_offset: int
    _data_size: int
    _scalars: tuple[tuple[str, int], ...]  # (name, byte offset in the data block)

    @classmethod
    def open(cls, owner_fd: int, what: str) -> BinaryStats:
        """``KVM_GET_STATS_FD`` on ``owner_fd`` (a VM or vCPU fd), then parse its layout."""
        fd = _sys.ioctl(owner_fd, uapi.KVM_GET_STATS_FD, 0, f"KVM_GET_STATS_FD({what})")
        try:
            with _sys.kernel_call("pread(kvm stats)"):
                hdr = uapi.kvm_stats_header.from_buffer_copy(
                    os.pread(fd, ctypes.sizeof(uapi.kvm_stats_header), 0)
                )
                desc_size = ctypes.sizeof(uapi.kvm_stats_desc) + hdr.name_size
                block = os.pread(fd, desc_size * hdr.num_desc, hdr.desc_offset)
        except BaseException:
            os.close(fd)
            raise
        scalars = []
        end = 0
        for i in range(hdr.num_desc):
            raw = block[i * desc_size : (i + 1) * desc_size]
            desc = uapi.kvm_stats_desc.from_buffer_copy(raw)
            name = raw[ctypes.sizeof(desc) :].split(b"\0", 1)[0].decode()
            end = max(end, desc.offset + 8 * desc.size)
            if desc.size == 1:
                scalars.append((name, desc.offset))
        return cls(fd, hdr.data_offset, end, tuple(scalars))

    def read(self) -> dict[str, int]:
        """Current values of every scalar statistic, by name."""
        with _sys.kernel_call("pread(kvm stats)"):
            data = os.pread(self.fileno(), self._data_size, self._data_offset)
        return {name: int.from_bytes(data[off : off + 8], "little") for name, off in self._scalars}
