"""Native helpers generated at run time: no compiled extension, no Python loop per page.

The code comes from :mod:`gmemlab.twin.asm`, is copied into an anonymous
mapping that is then made read+execute (never writable and executable at
once), and is called through ctypes.  It lives as long as the process.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

from gmemlab import uapi
from gmemlab.twin import _sys
from gmemlab.twin.asm import touch_pages_function

TouchFn = Callable[[int, int], None]


@functools.cache
def touch_pages() -> TouchFn:
    """``touch(addr, npages)``: store one byte at the start of each 4 KiB page, in order."""
    code = touch_pages_function()
    length = uapi.PAGE_SIZE
    prot = _sys.PROT_READ | _sys.PROT_WRITE
    addr = _sys.mmap(length, prot, _sys.MAP_PRIVATE | _sys.MAP_ANONYMOUS, what="mmap(code)")
    ctypes.memmove(addr, code, len(code))
    _sys.mprotect(addr, length, _sys.PROT_READ | _sys.PROT_EXEC)
    fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t)(addr)

    def touch(start: int, npages: int) -> None:
        fn(start, npages)

    return touch
