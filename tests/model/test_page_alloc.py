"""The page allocator's order: freed frames come back last-in first-out, whatever the form
the free list keeps them in, then never-used RAM in ascending order."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gmemlab.model.mm.memmap import MemMap
from gmemlab.model.mm.page_alloc import PageAllocator

NR = 4096
RAM_START = 256  # the first 1 MiB stays reserved

pfn = st.integers(0, NR - 1)
run = st.tuples(pfn, st.integers(1, 40), st.sampled_from([1, -1])).map(
    lambda t: [p for p in (t[0] + t[2] * i for i in range(t[1])) if 0 <= p < NR])
ops = st.lists(st.one_of(
    st.tuples(st.just("give"), pfn),
    st.tuples(st.just("give_many"), st.one_of(run, st.lists(pfn, max_size=20))),
    st.tuples(st.just("take"), st.just(0)),
    st.tuples(st.just("take_many"), st.integers(0, 60)),
    st.tuples(st.just("peek"), st.integers(0, 60)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_the_free_list_is_a_stack(script: list[tuple[str, object]]) -> None:
    alloc = PageAllocator(MemMap(NR), [(0, NR)])
    stack: list[int] = []
    never = list(range(RAM_START, NR))
    free = len(never)

    def expect(n: int) -> list[int]:
        return (stack[::-1] + never)[:n]

    for op, arg in script:
        if op == "give":
            assert isinstance(arg, int)
            alloc.give(arg)
            stack.append(arg)
            free += 1
        elif op == "give_many":
            assert isinstance(arg, list)
            alloc.give_many(np.array(arg, np.int64))
            stack.extend(arg)
            free += len(arg)
        elif op == "peek":
            assert isinstance(arg, int)
            assert alloc.peek(arg).tolist() == expect(arg)
        else:
            n = 1 if op == "take" else arg
            assert isinstance(n, int)
            want = expect(n)
            got = alloc.take_many(n).tolist() if op == "take_many" else [alloc.take()]
            assert got == want
            from_stack = min(n, len(stack))
            del stack[len(stack) - from_stack :]
            del never[: len(want) - from_stack]
            free -= len(want)
        assert alloc.freed_stack() == stack
        assert alloc.nr_free == free


def test_a_punched_range_is_kept_in_a_few_runs() -> None:
    """Freeing 32 Ki consecutive frames, ascending then descending, keeps a handful of
    integers, not one per frame: a 64 GiB punch-hole costs bytes."""
    alloc = PageAllocator(MemMap(1 << 16), [(0, 1 << 16)])
    alloc.give_many(np.arange(1000, 1000 + (1 << 15), dtype=np.int64))
    alloc.give_many(np.arange(40000, 39000, -1, dtype=np.int64))
    assert len(alloc.freed_stack()) == (1 << 15) + 1000
    assert alloc.nr_runs == 2
    assert alloc.take_many(3).tolist() == [39001, 39002, 39003]
    assert alloc.peek(2).tolist() == [39004, 39005]
