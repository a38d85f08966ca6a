"""Physical frames: the memmap (``struct page`` state) and frame contents.

Models ``include/linux/mm_types.h`` (``struct page``/``struct folio``) and
``include/linux/page-flags.h``.  guest_memfd, secretmem and shmem as modelled
here use order-0 folios, where a folio *is* its head page and is named by its
PFN; guest_memfd can also get 2 MiB folios (profile ``x86_64-gmem-thp``, design
``folio2m``), whose 512 pages carry ``PG_large`` and stay pages of their own in
the page cache (one entry per index, the page ``folio_file_page()`` gives).

State is kept column-wise, one array per field and one slot per frame, so a
64 GiB guest costs bytes per frame and no Python object per page nobody
touched.  Nothing is zeroed on free unless the kernel would (``init_on_free``,
secretmem), so old data stays visible in freed frames, as on real hardware.

Per-byte *secret* taint marks what the guest or the VMM wrote; the exposure
analysis counts the secret bytes an attacker can reach.

Contents (and their taint) take one of three forms per frame:

* *uniform*: every byte is ``fill[pfn]``; the taint is ``taint_full[pfn]``
  (1: every byte secret), or a 4 KiB mask in ``dense_taint`` when mixed.
* *patched*: ``fill[pfn]`` except one run ``[patch_off, patch_off + patch_len)``
  of ``patch_val``; ``patch_taint`` bit 0 is the run's taint, bit 1 the rest's
  (``taint_full`` is 1 only when both are set).  This is what a guest's
  one-byte ``Touch`` or a short write leaves on a zeroed page: 6 bytes of
  columns instead of 8 KiB, which is what makes a 64 GiB guest fit.
* *dense*: a 4 KiB buffer in ``dense`` (taint in ``taint_full``/``dense_taint``)
  for really mixed contents.

A frame is patched iff ``patch_off[pfn] >= 0``, and then it has neither a
``dense`` buffer nor a ``dense_taint`` mask.  ``fill`` and ``taint_full`` keep
their meaning in every form (``fill`` is the byte outside the run or under
the buffer, ``taint_full`` says every byte is secret).  The ``*_many``
methods apply the same operations to arrays of frames at once, for the
batched range paths (``gmemlab.model.ranges``).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from gmemlab.uapi import PAGE_SIZE

# page flags (bits of MemMap.flags)
PG_locked = 1 << 0
PG_uptodate = 1 << 1
PG_hwpoison = 1 << 2
# The frame is a page of a large (PMD-order, naturally aligned) folio: set on every page of
# it, as the model names pages, not folios (folio_test_large() of the page's folio).
PG_large = 1 << 3

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


Pfns = NDArray[np.int64]


# Who a frame belongs to besides the host (MemMap.guest_owned).
GUEST_OWNED_SNP = 1  # RMP entry assigned to an SNP guest (rmp_make_private())
GUEST_OWNED_TDX = 2  # mapped in a TD's secure EPT (TDH.MEM.PAGE.AUG / PAGE.ADD)


@dataclass(frozen=True, slots=True)
class Columns:
    """Zero-copy numpy views of the memmap columns (the batched paths write through them)."""

    state: NDArray[np.uint8]
    kind: NDArray[np.uint8]
    flags: NDArray[np.uint8]
    private: NDArray[np.uint8]
    refcount: NDArray[np.int32]
    mapcount: NDArray[np.int32]
    s2count: NDArray[np.int32]
    mapping: NDArray[np.int32]
    index: NDArray[np.int64]
    gen: NDArray[np.uint32]
    guest_owned: NDArray[np.uint8]
    invalidated: NDArray[np.uint8]
    fill: NDArray[np.uint8]
    taint_full: NDArray[np.uint8]
    patch_off: NDArray[np.int16]
    patch_len: NDArray[np.uint16]
    patch_val: NDArray[np.uint8]
    patch_taint: NDArray[np.uint8]


# What ``prep_new_page()`` sets on every allocation, besides the kind and a new generation.
_ALLOC_RESET = (
    ("state", FRAME_ALLOCATED),
    ("flags", 0),
    ("private", 0),
    ("refcount", 1),
    ("mapping", 0),
    ("index", 0),
    ("guest_owned", 0),
    ("invalidated", 0),
)


class MemMap:
    """The state of every physical frame, indexed by PFN."""

    __slots__ = (
        "_views",
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
        "patch_len",
        "patch_off",
        "patch_taint",
        "patch_val",
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
        # Arch state of confidential-VM hooks, GUEST_OWNED_*: sev_gmem_prepare() assigns
        # the frame in the RMP and sev_gmem_invalidate() takes it back; TDX's
        # tdh_mem_page_aug() gives it to the TD and tdh_mem_page_remove() takes it back.
        self.guest_owned = bytearray(nr_pages)
        self.invalidated = bytearray(nr_pages)  # arch invalidate ran in this lifetime
        # contents (see the module docstring for the three forms)
        self.fill = bytearray(nr_pages)
        self.dense: dict[int, bytearray] = {}
        self.taint_full = bytearray(nr_pages)
        self.dense_taint: dict[int, bytearray] = {}
        self.patch_off = array("h", b"\xff\xff" * nr_pages)  # -1: not patched
        self.patch_len = _zeros("H", nr_pages)
        self.patch_val = bytearray(nr_pages)
        self.patch_taint = bytearray(nr_pages)  # bit 0: the run is secret, bit 1: the rest is
        # Frames whose taint may have changed, collected for an observer (the exposure
        # analysis) while it is set; None costs the kernel paths nothing.
        self.taint_watch: set[int] | None = None
        self._views: Columns | None = None

    def views(self) -> Columns:
        """numpy views of the columns, made once: the columns are never resized."""
        v = self._views
        if v is None:
            def u8(b: bytearray) -> NDArray[np.uint8]:
                return np.frombuffer(b, np.uint8)

            v = self._views = Columns(
                u8(self.state), u8(self.kind), u8(self.flags), u8(self.private),
                np.frombuffer(self.refcount, np.int32), np.frombuffer(self.mapcount, np.int32),
                np.frombuffer(self.s2count, np.int32), np.frombuffer(self.mapping, np.int32),
                np.frombuffer(self.index, np.int64), np.frombuffer(self.gen, np.uint32),
                u8(self.guest_owned), u8(self.invalidated), u8(self.fill), u8(self.taint_full),
                np.frombuffer(self.patch_off, np.int16), np.frombuffer(self.patch_len, np.uint16),
                u8(self.patch_val), u8(self.patch_taint))
        return v

    # --- state ----------------------------------------------------------------------
    def allocated(self, pfn: int) -> bool:
        return self.state[pfn] == FRAME_ALLOCATED

    def test_locked(self, pfn: int) -> bool:
        return bool(self.flags[pfn] & PG_locked)

    def test_uptodate(self, pfn: int) -> bool:
        return bool(self.flags[pfn] & PG_uptodate)

    def reset_for_alloc(self, pfn: int, kind: int) -> None:
        """``prep_new_page()``: a fresh folio lifetime on this frame (contents untouched)."""
        for column, value in _ALLOC_RESET:
            getattr(self, column)[pfn] = value
        self.kind[pfn] = kind
        self.gen[pfn] += 1

    def mark_free(self, pfn: int) -> None:
        """The frame is back on a free list (``free_pages_prepare()``): no folio, no owner."""
        self.state[pfn] = FRAME_FREE
        self.kind[pfn] = KIND_NONE
        self.flags[pfn] = 0
        self.mapping[pfn] = 0
        self.refcount[pfn] = 0

    def mark_free_many(self, pfns: Pfns) -> None:
        """:meth:`mark_free` for each of ``pfns``."""
        v = self.views()
        v.state[pfns] = FRAME_FREE
        v.kind[pfns] = KIND_NONE
        v.flags[pfns] = 0
        v.mapping[pfns] = 0
        v.refcount[pfns] = 0

    def reset_for_alloc_many(self, pfns: Pfns, kind: int) -> None:
        """:meth:`reset_for_alloc` for each of ``pfns`` (distinct)."""
        v = self.views()
        for column, value in _ALLOC_RESET:
            getattr(v, column)[pfns] = value
        v.kind[pfns] = kind
        v.gen[pfns] += 1

    # --- contents -----------------------------------------------------------------------
    def read(self, pfn: int, off: int, n: int) -> bytes:
        buf = self.dense.get(pfn)
        if buf is not None:
            return bytes(buf[off : off + n])
        out = bytes((self.fill[pfn],)) * n
        po = self.patch_off[pfn]
        if po < 0:
            return out
        lo, hi = max(off, po), min(off + n, po + self.patch_len[pfn])
        if lo >= hi:
            return out
        b = bytearray(out)
        b[lo - off : hi - off] = bytes((self.patch_val[pfn],)) * (hi - lo)
        return bytes(b)

    def byte_at(self, pfn: int, off: int) -> int:
        buf = self.dense.get(pfn)
        if buf is not None:
            return buf[off]
        po = self.patch_off[pfn]
        if 0 <= po <= off < po + self.patch_len[pfn]:
            return self.patch_val[pfn]
        return self.fill[pfn]

    def mismatch(self, pfn: int, off: int, n: int, value: int) -> int:
        """Offset (within the range) of the first byte differing from ``value``, or -1."""
        buf = self.dense.get(pfn)
        if buf is None:
            for lo, _hi, v in self._segments(pfn, off, off + n):
                if v != value:
                    return lo - off
            return -1
        for i in range(off, off + n):
            if buf[i] != value:
                return i - off
        return -1

    def _segments(self, pfn: int, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """[lo, hi) of a non-dense frame as runs of equal bytes: (start, end, value)."""
        fill = self.fill[pfn]
        po = self.patch_off[pfn]
        if po < 0:
            return [(lo, hi, fill)]
        pe = po + self.patch_len[pfn]
        segs = [(lo, min(hi, po), fill), (max(lo, po), min(hi, pe), self.patch_val[pfn]),
                (max(lo, pe), hi, fill)]
        return [s for s in segs if s[0] < s[1]]

    def is_uniform(self, pfn: int) -> bool:
        if pfn in self.dense:
            return False
        return self.patch_off[pfn] < 0 or self.patch_val[pfn] == self.fill[pfn]

    def write(self, pfn: int, off: int, data: bytes, *, secret: bool) -> None:
        n = len(data)
        if n and data.count(data[0]) == n:
            self.memset(pfn, off, n, data[0], secret=secret)
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
            if self.patch_off[pfn] >= 0:
                self._unpatch(pfn)
            if self.taint_watch is not None:
                self.taint_watch.add(pfn)
            return
        if pfn not in self.dense and self._memset_compact(pfn, off, n, value, 1 if secret else 0):
            if self.taint_watch is not None:
                self.taint_watch.add(pfn)
            return
        buf = self._dense(pfn)
        buf[off : off + n] = bytes((value,)) * n
        self._taint(pfn, off, n, secret)

    def _memset_compact(self, pfn: int, off: int, n: int, value: int, t: int) -> bool:
        """Set [off, off+n) of a non-dense frame and keep it uniform or patched, if possible."""
        if pfn in self.dense_taint:
            if self.fill[pfn] != value or self.patch_off[pfn] >= 0:
                return False
            self._taint(pfn, off, n, bool(t))  # contents unchanged; the mask takes the taint
            return True
        fill = self.fill[pfn]
        po = self.patch_off[pfn]
        if po < 0:
            base = self.taint_full[pfn]
            if value != fill or t != base:
                self._patch(pfn, off, n, value, t, base)
            return True
        pt = self.patch_taint[pfn]
        base = pt >> 1
        pe = po + self.patch_len[pfn]
        if off <= po and pe <= off + n:  # covers the run: the new range is the run
            if value == fill and t == base:
                self._unpatch(pfn)
                self.taint_full[pfn] = base
            else:
                self._patch(pfn, off, n, value, t, base)
            return True
        if value == fill and t == base and (off + n <= po or pe <= off):
            return True  # rewrites bytes outside the run with what they hold
        if value == self.patch_val[pfn] and t == pt & 1 and off <= pe and po <= off + n:
            lo, hi = min(off, po), max(off + n, pe)  # overlaps or touches the run: merge
            self._patch(pfn, lo, hi - lo, value, t, base)
            return True
        return False

    def _patch(self, pfn: int, off: int, n: int, value: int, t: int, base: int) -> None:
        if n == _FULL_PAGE:  # a run grown over the whole page: uniform again
            self._unpatch(pfn)
            self.fill[pfn] = value
            self.taint_full[pfn] = t
            return
        self.patch_off[pfn] = off
        self.patch_len[pfn] = n
        self.patch_val[pfn] = value
        self.patch_taint[pfn] = t | base << 1
        self.taint_full[pfn] = t & base

    def _unpatch(self, pfn: int) -> None:
        self.patch_off[pfn] = -1
        self.patch_len[pfn] = 0
        self.patch_val[pfn] = 0
        self.patch_taint[pfn] = 0

    def zero(self, pfn: int) -> None:
        """``clear_page()``: all zero, nothing secret left."""
        self.dense.pop(pfn, None)
        self.dense_taint.pop(pfn, None)
        self.fill[pfn] = 0
        self.taint_full[pfn] = 0
        if self.patch_off[pfn] >= 0:
            self._unpatch(pfn)
        if self.taint_watch is not None:
            self.taint_watch.add(pfn)

    def secret_bytes(self, pfn: int) -> int:
        if self.taint_full[pfn]:
            return _FULL_PAGE
        if self.patch_off[pfn] >= 0:
            pt = self.patch_taint[pfn]
            n = self.patch_len[pfn]
            return (n if pt & 1 else 0) + (_FULL_PAGE - n if pt & 2 else 0)
        mask = self.dense_taint.get(pfn)
        return mask.count(1) if mask is not None else 0

    def secret_frames(self) -> list[int]:
        """Every frame holding at least one secret byte, ascending (a full scan)."""
        v = self.views()
        some = (v.taint_full != 0) | ((v.patch_off >= 0) & (v.patch_taint != 0))
        out = set(np.flatnonzero(some).tolist())
        out.update(self.dense_taint)
        return sorted(out)

    def _dense(self, pfn: int) -> bytearray:
        buf = self.dense.get(pfn)
        if buf is None:
            buf = bytearray((self.fill[pfn],)) * _FULL_PAGE
            po = self.patch_off[pfn]
            if po >= 0:
                # The run moves into the buffer, its taint into a mask (or taint_full).
                pe = po + self.patch_len[pfn]
                buf[po:pe] = bytes((self.patch_val[pfn],)) * (pe - po)
                pt = self.patch_taint[pfn]
                if pt in (1, 2):
                    mask = bytearray((pt >> 1,)) * _FULL_PAGE
                    mask[po:pe] = bytes((pt & 1,)) * (pe - po)
                    self.dense_taint[pfn] = mask
                self._unpatch(pfn)
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

    # --- contents of many frames at once (the batched paths) -----------------------------
    def _mixed(self, pfns: Pfns) -> NDArray[np.bool_]:
        """Which of ``pfns`` have a dense buffer or a dense taint mask."""
        keys = self.dense.keys() | self.dense_taint.keys()
        if not keys:
            return np.zeros(len(pfns), np.bool_)
        return np.isin(pfns, np.fromiter(keys, np.int64, len(keys)))

    def _watch(self, pfns: Pfns) -> None:
        if self.taint_watch is not None:
            self.taint_watch.update(pfns.tolist())

    def zero_many(self, pfns: Pfns) -> None:
        """:meth:`zero` for each of ``pfns``."""
        self.memset_pages(pfns, 0, secret=False)

    def memset_pages(self, pfns: Pfns, value: int, *, secret: bool) -> None:
        """A whole-page :meth:`memset` of each of ``pfns``: they become uniform."""
        v = self.views()
        for p in pfns[self._mixed(pfns)].tolist():
            self.dense.pop(p, None)
            self.dense_taint.pop(p, None)
        v.fill[pfns] = value
        v.taint_full[pfns] = 1 if secret else 0
        v.patch_off[pfns] = -1
        v.patch_len[pfns] = 0
        v.patch_val[pfns] = 0
        v.patch_taint[pfns] = 0
        self._watch(pfns)

    def memset_many(self, pfns: Pfns, off: int, n: int, value: int, *, secret: bool) -> None:
        """:meth:`memset` of [off, off+n) in each of ``pfns`` (distinct), same result.

        Vectorised for frames that stay compact the common ways (a uniform frame
        gets a run; a run is rewritten in place); the rest go one by one.
        """
        if n == _FULL_PAGE:
            self.memset_pages(pfns, value, secret=secret)
            return
        v = self.views()
        t = 1 if secret else 0
        po = v.patch_off[pfns]
        mixed = self._mixed(pfns)
        fill = v.fill[pfns]
        uniform = (po < 0) & ~mixed
        # A uniform frame with uniform taint: unchanged, or patched with the new run.
        base = v.taint_full[pfns]
        patch = uniform & ((fill != value) | (base != t))
        # A patched frame whose run is exactly [off, off+n): the run takes the new value.
        same_run = (po == off) & (v.patch_len[pfns] == n)
        rebase = v.patch_taint[pfns] >> 1
        back = same_run & (fill == value) & (rebase == t)
        repatch = same_run & ~back
        base = np.where(same_run, rebase, base)
        sel = pfns[patch | repatch]
        if len(sel):
            b = base[patch | repatch]
            v.patch_off[sel] = off
            v.patch_len[sel] = n
            v.patch_val[sel] = value
            v.patch_taint[sel] = t | (b << 1)
            v.taint_full[sel] = t & b
        sel = pfns[back]
        if len(sel):
            v.taint_full[sel] = rebase[back]
            v.patch_off[sel] = -1
            v.patch_len[sel] = 0
            v.patch_val[sel] = 0
            v.patch_taint[sel] = 0
        self._watch(pfns[uniform | same_run])
        for p in pfns[~(uniform | same_run)].tolist():
            self.memset(p, off, n, value, secret=secret)

    def first_mismatch(self, pfns: Pfns, off: int, n: int, value: int) -> int:
        """Position in ``pfns`` of the first frame whose [off, off+n) is not all ``value``, or -1."""
        v = self.views()
        po = v.patch_off[pfns].astype(np.int64)
        pe = po + v.patch_len[pfns]
        patched = po >= 0
        covered = patched & (po <= off) & (off + n <= pe)  # the range lies inside the run
        overlaps = patched & (po < off + n) & (off < pe)
        bad = ((v.fill[pfns] != value) & ~covered) | (overlaps & (v.patch_val[pfns] != value))
        dense = self.dense
        if dense:
            for i in np.flatnonzero(np.isin(pfns, np.fromiter(dense, np.int64, len(dense)))).tolist():
                bad[i] = self.mismatch(int(pfns[i]), off, n, value) >= 0
        hits = np.flatnonzero(bad)
        return int(hits[0]) if len(hits) else -1
