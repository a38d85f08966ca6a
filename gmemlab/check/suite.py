"""Running the checker over designs and scenarios (what ``gmemlab check`` does)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gmemlab.check.execution import CHECKER_PROPERTIES, DesignSpec
from gmemlab.check.explore import Bounds, Progress, Result, explore, random_search
from gmemlab.check.scenarios import STANDARD, Scenario
from gmemlab.model.designs import DESIGNS
from gmemlab.model.invariants import INVARIANTS


@dataclass(frozen=True, slots=True)
class Options:
    bounds: Bounds = field(default_factory=Bounds)
    ignore: frozenset[str] = frozenset()
    all_violations: bool = False  # report every property a cell breaks, not just the first
    random: bool = False  # PCT runs instead of exhaustive search
    seed: int = 0
    runs: int = 300
    pct_depth: int = 3


def series_designs() -> list[str]:
    """Every design that implements the series (the checker's default), in registry order."""
    return [name for name, factory in DESIGNS.items() if factory().series]


def property_names() -> list[str]:
    return [*INVARIANTS, *CHECKER_PROPERTIES]


def check_one(design: DesignSpec, scenario: Scenario, opts: Options = Options(), *,
              design_name: str | None = None, progress: Progress | None = None) -> Result:
    if opts.random:
        return random_search(scenario, design, seed=opts.seed, runs=opts.runs, depth=opts.pct_depth,
                             design_name=design_name, bounds=opts.bounds, ignore=opts.ignore,
                             stop_at_first=not opts.all_violations, progress=progress)
    return explore(scenario, design, design_name=design_name, bounds=opts.bounds, ignore=opts.ignore,
                   stop_at_first=not opts.all_violations, progress=progress)


def check(designs: Iterable[str], scenarios: Iterable[Scenario] = STANDARD, opts: Options = Options(),
          progress: Callable[[str, Scenario], Progress | None] | None = None) -> list[Result]:
    """Every design against every scenario; ``progress(design, scenario)`` makes a callback."""
    scenarios = list(scenarios)
    out = []
    for d in designs:
        for s in scenarios:
            out.append(check_one(d, s, opts, progress=progress(d, s) if progress else None))
    return out
