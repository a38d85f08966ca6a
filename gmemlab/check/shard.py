"""Where the explorer's expanders run: in its own process, in forked processes, or on Ray.

Every pool offers the same two calls: ``root()`` (on the first worker) and
``expand(batches, stop_at_first)``, one batch per worker, all expanded at once.
The explorer merges the answers in schedule order (``explore.py``), so the
verdicts and counterexamples do not depend on the pool or on its size; only
the number of replays does (a worker continues in place only the states it
found itself).

* :class:`LocalPool`: one expander, called directly (``--workers 1``).
* :class:`ProcessPool`: ``N`` processes forked from the explorer (``--workers N``),
  which inherit the scenario and the design as they are (closures included)
  and talk over pipes.
* :class:`RayPool`: ``N`` Ray actors (``--ray ADDRESS``), on the cluster at
  ``ADDRESS`` (``local``: a Ray instance started for this process).  The
  scenario and design travel with cloudpickle.  Fingerprints hash strings, so
  every actor must hash alike: a local instance is started with
  ``PYTHONHASHSEED`` set, a cluster must be (the pool checks; the explorer
  itself computes no fingerprint in this mode).
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import importlib.util
import multiprocessing
import os
from collections.abc import Callable, Hashable
from multiprocessing.connection import Connection
from typing import Any, Protocol

from gmemlab.check.execution import DesignSpec
from gmemlab.check.expand import Batch, Expander, Limits, Node, Root
from gmemlab.check.scenarios import Scenario

RAY_LOCAL = "local"
# Fingerprints hash strings: the seed a local Ray instance (and a cluster) gives its workers.
RAY_HASH_SEED = "0"


class Pool(Protocol):
    size: int

    def root(self) -> Root: ...

    def expand(self, batches: list[list[Node]], stop_at_first: bool) -> list[Batch]: ...

    def close(self) -> None: ...


class LocalPool:
    """One expander in the explorer's own process."""

    def __init__(self, expander: Expander) -> None:
        self.size = 1
        self.expander = expander

    def root(self) -> Root:
        return self.expander.root()

    def expand(self, batches: list[list[Node]], stop_at_first: bool) -> list[Batch]:
        return [self.expander.expand(batches[0], stop_at_first)]

    def close(self) -> None:
        self.expander.live.clear()


def _serve(conn: Connection, expander: Expander) -> None:
    """A forked worker: answer ``(method, args)`` requests until told to stop (``None``)."""
    while (request := conn.recv()) is not None:
        method, args = request
        try:
            conn.send((True, getattr(expander, method)(*args)))
        except BaseException as e:  # the explorer re-raises it
            conn.send((False, e))
    conn.close()


class ProcessPool:
    """``size`` forked worker processes, one expander each."""

    def __init__(self, make: Callable[[], Expander], size: int) -> None:
        if "fork" not in multiprocessing.get_all_start_methods():
            raise OSError(f"--workers needs fork(), which this platform ({os.name}) lacks")
        ctx = multiprocessing.get_context("fork")
        self.size = size
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        expander = make()  # built before the fork: every worker inherits it
        for _ in range(size):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(theirs, expander), daemon=True)
            proc.start()
            theirs.close()
            self.conns.append(ours)
            self.procs.append(proc)

    def _call(self, i: int, method: str, *args: object) -> None:
        self.conns[i].send((method, args))

    def _answer(self, i: int) -> Any:
        ok, value = self.conns[i].recv()
        if not ok:
            raise value
        return value

    def root(self) -> Root:
        self._call(0, "root")
        return self._answer(0)  # type: ignore[no-any-return]

    def expand(self, batches: list[list[Node]], stop_at_first: bool) -> list[Batch]:
        busy = [i for i, b in enumerate(batches) if b]
        for i in busy:
            self._call(i, "expand", batches[i], stop_at_first)
        out = [Batch([], False, 0, set()) for _ in batches]
        for i in busy:
            out[i] = self._answer(i)
        return out

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):  # already gone: join() below reaps it
                conn.send(None)
            conn.close()
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join()


def _ray() -> Any:
    """The ``ray`` module (an optional dependency: typed loosely, imported when used)."""
    return importlib.import_module("ray")


def ray_available() -> str | None:
    """Why ``--ray`` cannot be used here (None: it can)."""
    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed (pip install 'gmemlab[ray]')"
    return None


def ray_connect(address: str) -> None:
    """Join the Ray cluster at ``address`` (``local``: start one for this process), once."""
    ray = _ray()
    if not ray.is_initialized():
        if address == RAY_LOCAL:
            os.environ["PYTHONHASHSEED"] = RAY_HASH_SEED  # the workers inherit it
        ray.init(address=None if address == RAY_LOCAL else address, log_to_driver=False,
                 include_dashboard=False, configure_logging=False)


def ray_cpus() -> int:
    return max(1, int(_ray().cluster_resources().get("CPU", 1)))


class RayPool:
    """``size`` Ray actors, one expander each, on the cluster joined by :func:`ray_connect`."""

    def __init__(self, scenario: Scenario, design: DesignSpec, ignore: frozenset[str],
                 limits: Limits, size: int) -> None:
        self.ray = ray = _ray()
        remote = ray.remote(num_cpus=1)(Expander)
        self.size = size
        self.actors: list[Any] = [remote.remote(scenario, design, ignore, limits)
                                  for _ in range(size)]
        seeds = set(ray.get([a.hash_probe.remote() for a in self.actors]))
        if len(seeds) > 1:
            self.close()
            raise OSError(errno.EINVAL, "the Ray workers hash strings differently: start the "
                                        f"cluster with PYTHONHASHSEED={RAY_HASH_SEED} set")

    def root(self) -> Root:
        root: Root = self.ray.get(self.actors[0].root.remote())
        return root

    def expand(self, batches: list[list[Node]], stop_at_first: bool) -> list[Batch]:
        refs = {i: self.actors[i].expand.remote(b, stop_at_first) for i, b in enumerate(batches) if b}
        done: dict[int, Batch] = dict(zip(refs, self.ray.get(list(refs.values())), strict=True))
        return [done.get(i, Batch([], False, 0, set())) for i in range(len(batches))]

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)


def share(frontier: list[Node], owner: dict[Hashable, int], n: int) -> list[list[Node]]:
    """Split a level between ``n`` workers: each takes the nodes it found (it kept their
    executions alive) up to an equal share; the rest go to the least loaded, in order."""
    if n == 1:
        return [frontier]
    quota = -(-len(frontier) // n)
    out: list[list[Node]] = [[] for _ in range(n)]
    rest = []
    for node in frontier:
        mine = out[owner.get(node.key, 0)]
        if len(mine) < quota:
            mine.append(node)
        else:
            rest.append(node)
    for node in rest:
        min(out, key=len).append(node)
    for batch in out:
        batch.sort(key=lambda nd: nd.schedule)
    return out


def open_pool(scenario: Scenario, design: DesignSpec, ignore: frozenset[str], limits: Limits,
              workers: int = 1, ray_address: str | None = None) -> Pool:
    """The pool ``explore`` runs its expanders in (``workers`` 0 with Ray: one per cluster CPU)."""
    if ray_address is not None:
        ray_connect(ray_address)
        return RayPool(scenario, design, ignore, limits, workers or ray_cpus())
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")

    def make() -> Expander:
        return Expander(scenario, design, ignore, limits)

    return LocalPool(make()) if workers == 1 else ProcessPool(make, workers)
