"""Fixtures of the checker tests: the v12 suite is explored once per session."""

from __future__ import annotations

import pytest

from gmemlab.check.explore import Result
from gmemlab.check.scenarios import STANDARD
from gmemlab.check.suite import check


@pytest.fixture(scope="session")
def v12_suite() -> list[Result]:
    return check(["v12"], STANDARD)
