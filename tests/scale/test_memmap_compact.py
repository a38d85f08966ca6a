"""Frame contents in their compact forms behave like a plain 4 KiB buffer per frame.

Random writes, memsets, zeroes and their batched versions are applied both to
a :class:`MemMap` and to a reference (bytes and a taint mask per frame); every
public reader must agree, and frames that only ever saw uniform fills and
short runs must stay compact.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gmemlab.model.mm.memmap import MemMap

PAGE = 4096
NPAGES = 4

offsets = st.integers(0, PAGE - 1)
values = st.sampled_from([0, 1, 0x5A, 0xC3])


@st.composite
def ops(draw: st.DrawFn) -> tuple[object, ...]:
    kind = draw(st.sampled_from(["memset", "write", "zero", "page", "many", "pages", "zmany"]))
    pfn = draw(st.integers(0, NPAGES - 1))
    off = draw(offsets)
    n = draw(st.integers(1, PAGE - off))
    n = draw(st.sampled_from([n, 1, PAGE - off]))
    secret = draw(st.booleans())
    if kind == "write":
        data = bytes(draw(st.lists(values, min_size=n, max_size=n))) if n <= 8 else bytes(
            (draw(values),)) * (n - 1) + bytes((draw(values),))
        return (kind, pfn, off, data, secret)
    return (kind, pfn, off, n, draw(values), secret)


class Reference:
    def __init__(self) -> None:
        self.data = [bytearray(PAGE) for _ in range(NPAGES)]
        self.taint = [bytearray(PAGE) for _ in range(NPAGES)]

    def set(self, pfn: int, off: int, data: bytes, secret: bool) -> None:
        self.data[pfn][off : off + len(data)] = data
        self.taint[pfn][off : off + len(data)] = bytes((int(secret),)) * len(data)


def apply(mem: MemMap, ref: Reference, op: tuple[object, ...]) -> None:
    kind, pfn, off = op[0], int(op[1]), int(op[2])  # type: ignore[call-overload]
    pfns = np.array([pfn, (pfn + 1) % NPAGES], np.int64)
    if kind == "write":
        data, secret = op[3], op[4]
        assert isinstance(data, bytes) and isinstance(secret, bool)
        mem.write(pfn, off, data, secret=secret)
        ref.set(pfn, off, data, secret)
        return
    n, value, secret = int(op[3]), int(op[4]), bool(op[5])  # type: ignore[call-overload]
    if kind == "memset":
        mem.memset(pfn, off, n, value, secret=secret)
        ref.set(pfn, off, bytes((value,)) * n, secret)
    elif kind == "page":
        mem.memset(pfn, 0, PAGE, value, secret=secret)
        ref.set(pfn, 0, bytes((value,)) * PAGE, secret)
    elif kind == "zero":
        mem.zero(pfn)
        ref.set(pfn, 0, bytes(PAGE), False)
    elif kind == "many":
        mem.memset_many(pfns, off, n, value, secret=secret)
        for p in pfns.tolist():
            ref.set(p, off, bytes((value,)) * n, secret)
    elif kind == "pages":
        mem.memset_pages(pfns, value, secret=secret)
        for p in pfns.tolist():
            ref.set(p, 0, bytes((value,)) * PAGE, secret)
    else:
        mem.zero_many(pfns)
        for p in pfns.tolist():
            ref.set(p, 0, bytes(PAGE), False)


def agree(mem: MemMap, ref: Reference) -> None:
    for pfn in range(NPAGES):
        data, taint = bytes(ref.data[pfn]), ref.taint[pfn]
        assert mem.read(pfn, 0, PAGE) == data
        assert mem.read(pfn, 100, 50) == data[100:150]
        assert mem.byte_at(pfn, 77) == data[77]
        assert mem.secret_bytes(pfn) == taint.count(1)
        assert bool(mem.taint_full[pfn]) == (taint.count(1) == PAGE)
        if pfn not in mem.dense:  # a buffer is never uniform, whatever its bytes
            assert mem.is_uniform(pfn) == (data.count(data[0]) == PAGE)
        for value in (0, 1, 0x5A):
            want = next((i for i, b in enumerate(data[10:3000]) if b != value), -1)
            assert mem.mismatch(pfn, 10, 2990, value) == want
        if mem.patch_off[pfn] >= 0:
            assert pfn not in mem.dense and pfn not in mem.dense_taint
    assert mem.secret_frames() == [p for p in range(NPAGES) if ref.taint[p].count(1)]
    pfns = np.arange(NPAGES, dtype=np.int64)
    for value in (0, 0x5A):
        bad = [p for p in range(NPAGES) if bytes(ref.data[p][5:905]) != bytes((value,)) * 900]
        assert mem.first_mismatch(pfns, 5, 900, value) == (bad[0] if bad else -1)


@settings(max_examples=300, deadline=None)
@given(st.lists(ops(), max_size=12))
def test_compact_contents_match_a_plain_buffer(seq: list[tuple[object, ...]]) -> None:
    mem = MemMap(NPAGES)
    ref = Reference()
    for op in seq:
        apply(mem, ref, op)
        agree(mem, ref)


def test_touch_and_short_runs_stay_compact() -> None:
    mem = MemMap(NPAGES)
    pfns = np.arange(NPAGES, dtype=np.int64)
    mem.zero_many(pfns)
    mem.memset_many(pfns, 0, 1, 1, secret=True)  # a guest Touch
    mem.memset_many(pfns, 0, 1, 2, secret=True)  # and again, another value
    mem.write(0, 0xFC0, bytes(32), secret=False)  # a pvclock write on a zeroed page
    mem.memset(1, 1, 10, 2, secret=True)  # grows the run
    assert not mem.dense and not mem.dense_taint
    assert [mem.secret_bytes(p) for p in range(NPAGES)] == [1, 11, 1, 1]
