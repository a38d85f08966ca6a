"""Physical frames: the memmap (``struct page`` state) and frame contents.

Models ``include/linux/mm_types.h`` (``struct page``/``struct folio``) and
``include/linux/page-flags.h``.  guest_memfd, secretmem and shmem as modelled
here only use order-0 folios (v12 ``folio_zap_direct_map()`` rejects large
ones), so a folio *is* its head page and is named by its PFN.

State is kept column-wise, one array per field and one slot per frame, so a
64 GiB guest costs bytes per frame and no Python object per page nobody
touched.  Contents are kept compactly: a frame whose bytes are all equal (the
zero page, a memset) is one byte; only frames with mixed bytes hold a 4 KiB
buffer.  Nothing is zeroed on free unless the kernel would (``init_on_free``,
secretmem), so old data stays visible in freed frames, as on real hardware.

Per-byte *secret* taint marks what the guest or the VMM wrote; the exposure
analysis counts the secret bytes an attacker can reach.
"""

from __future__ import annotations

from array import array

from gmemlab.uapi import PAGE_SIZE

# page flags (bits of MemMap.flags)
PG_locked = 1 << 0
PG_uptodate = 1 << 1
PG_hwpoison = 1 << 2

# frame state
FRAME_FREE = 0
FRAME_HOLE = 1  # not RAM: never allocated, not in the direct map
FRAME_ALLOCATED = 2

# who holds an allocated frame (for reports and the exposure analysis)
KIND_NONE = 0
KIND_FILE = 1  # page cache (guest_memfd, secretmem, shmem)
KIND_ANON = 2
KIND_KERNEL = 3
KIND_PGTABLE = 4
KIND_NAMES = {
    KIND_NONE: "free",
    KIND_FILE: "file",
    KIND_ANON: "anon",
    KIND_KERNEL: "kernel",
    KIND_PGTABLE: "pgtable",
}

_FULL_PAGE = PAGE_SIZE


def _zeros(code: str, n: int) -> array:  # type: ignore[type-arg]
    return array(code, bytes(array(code).itemsize * n))


class MemMap:
    """The state of every physical frame, indexed by PFN."""

    __slots__ = (
        "dense",
        "dense_taint",
        "fill",
        "flags",
        "gen",
        "guest_owned",
        "index",
        "invalidated",
        "kind",
        "mapcount",
        "mapping",
        "nr_pages",
        "private",
        "refcount",
        "s2count",
        "state",
        "taint_full",
        "taint_watch",
    )

    def __init__(self, nr_pages: int) -> None:
        self.nr_pages = nr_pages
        self.state = bytearray([FRAME_HOLE]) * nr_pages
        self.kind = bytearray(nr_pages)
        self.flags = bytearray(nr_pages)
        self.private = bytearray(nr_pages)  # low byte of folio->private
        self.refcount = _zeros("i", nr_pages)
        self.mapcount = _zeros("i", nr_pages)  # user PTEs (folio_mapcount)
        # Model instrumentation, not kernel state: stage-2 mappings per frame, so the
        # invariants can see what the guest maps.
        self.s2count = _zeros("i", nr_pages)
        self.mapping = _zeros("i", nr_pages)  # address_space id, 0 = NULL
        self.index = _zeros("q", nr_pages)
        self.gen = _zeros("I", nr_pages)  # bumped at each allocation: one folio lifetime
        # Arch state of confidential-VM hooks: kvm_arch_gmem_prepare() assigns the frame
        # to the guest (SNP RMP), kvm_arch_gmem_invalidate() takes it back.
        self.guest_owned = bytearray(nr_pages)
        self.invalidated = bytearray(nr_pages)  # arch invalidate ran in this lifetime
        # contents
        self.fill = bytearray(nr_pages)
        self.dense: dict[int, bytearray] = {}
        self.taint_full = bytearray(nr_pages)
        self.dense_taint: dict[int, bytearray] = {}
        # Frames whose taint may have changed, collected for an observer (the exposure
        # analysis) while it is set; None costs the kernel paths nothing.
        self.taint_watch: set[int] | None = None

    # --- state ----------------------------------------------------------------------
    def allocated(self, pfn: int) -> bool:
        return self.state[pfn] == FRAME_ALLOCATED

    def test_locked(self, pfn: int) -> bool:
        return bool(self.flags[pfn] & PG_locked)

    def test_uptodate(self, pfn: int) -> bool:
        return bool(self.flags[pfn] & PG_uptodate)

    def reset_for_alloc(self, pfn: int, kind: int) -> None:
        """``prep_new_page()``: a fresh folio lifetime on this frame (contents untouched)."""
        self.state[pfn] = FRAME_ALLOCATED
        self.kind[pfn] = kind
        self.flags[pfn] = 0
        self.private[pfn] = 0
        self.refcount[pfn] = 1
        self.mapping[pfn] = 0
        self.index[pfn] = 0
        self.gen[pfn] += 1
        self.guest_owned[pfn] = 0
        self.invalidated[pfn] = 0

    # --- contents -----------------------------------------------------------------------
    def read(self, pfn: int, off: int, n: int) -> bytes:
        buf = self.dense.get(pfn)
        if buf is not None:
            return bytes(buf[off : off + n])
        return bytes((self.fill[pfn],)) * n

    def byte_at(self, pfn: int, off: int) -> int:
        buf = self.dense.get(pfn)
        return buf[off] if buf is not None else self.fill[pfn]

    def mismatch(self, pfn: int, off: int, n: int, value: int) -> int:
        """Offset (within the range) of the first byte differing from ``value``, or -1."""
        buf = self.dense.get(pfn)
        if buf is None:
            return -1 if self.fill[pfn] == value else 0
        for i in range(off, off + n):
            if buf[i] != value:
                return i - off
        return -1

    def is_uniform(self, pfn: int) -> bool:
        return pfn not in self.dense

    def write(self, pfn: int, off: int, data: bytes, *, secret: bool) -> None:
        n = len(data)
        if n == _FULL_PAGE and data.count(data[0]) == n:
            self.memset(pfn, 0, n, data[0], secret=secret)
            return
        buf = self._dense(pfn)
        buf[off : off + n] = data
        self._taint(pfn, off, n, secret)

    def memset(self, pfn: int, off: int, n: int, value: int, *, secret: bool) -> None:
        if n == _FULL_PAGE:
            self.dense.pop(pfn, None)
            self.fill[pfn] = value
            self.dense_taint.pop(pfn, None)
            self.taint_full[pfn] = 1 if secret else 0
            if self.taint_watch is not None:
                self.taint_watch.add(pfn)
            return
        buf = self.dense.get(pfn)
        if buf is None and self.fill[pfn] != value:
            buf = self._dense(pfn)
        if buf is not None:
            buf[off : off + n] = bytes((value,)) * n
        self._taint(pfn, off, n, secret)

    def zero(self, pfn: int) -> None:
        """``clear_page()``: all zero, nothing secret left."""
        self.dense.pop(pfn, None)
        self.dense_taint.pop(pfn, None)
        self.fill[pfn] = 0
        self.taint_full[pfn] = 0
        if self.taint_watch is not None:
            self.taint_watch.add(pfn)

    def secret_bytes(self, pfn: int) -> int:
        if self.taint_full[pfn]:
            return _FULL_PAGE
        mask = self.dense_taint.get(pfn)
        return mask.count(1) if mask is not None else 0

    def _dense(self, pfn: int) -> bytearray:
        buf = self.dense.get(pfn)
        if buf is None:
            buf = bytearray((self.fill[pfn],)) * _FULL_PAGE
            self.dense[pfn] = buf
        return buf

    def _taint(self, pfn: int, off: int, n: int, secret: bool) -> None:
        if self.taint_watch is not None:
            self.taint_watch.add(pfn)
        mask = self.dense_taint.get(pfn)
        if mask is None:
            full = self.taint_full[pfn]
            if bool(full) == secret:
                return
            mask = bytearray((full,)) * _FULL_PAGE
            self.dense_taint[pfn] = mask
            self.taint_full[pfn] = 0
        mask[off : off + n] = (b"\x01" if secret else b"\x00") * n
        ones = mask.count(1)
        if ones in (0, _FULL_PAGE):
            del self.dense_taint[pfn]
            self.taint_full[pfn] = 1 if ones else 0
