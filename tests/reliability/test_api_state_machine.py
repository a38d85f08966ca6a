"""The reliability driver's calls under Hypothesis: a ``RuleBasedStateMachine`` draws each
call with :func:`driver.generate` from a Hypothesis-controlled ``Random``, so Hypothesis
explores and shrinks the sequences itself; every step is held to the driver's oracle,
``check_all()`` runs after each, and the teardown must give every frame back."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tests.reliability.driver import World, generate, judge


class ApiMachine(RuleBasedStateMachine):
    design = "v12"
    profile = "x86_64"
    w: World

    @initialize()
    def setup(self) -> None:
        self.w = World(self.design, self.profile)

    @rule(rnd=st.randoms(use_true_random=False))
    def call(self, rnd: random.Random) -> None:
        op = generate(rnd, self.w)
        note(str(op))
        self.w.apply(op)

    @invariant()
    def machine_is_consistent(self) -> None:
        if hasattr(self, "w"):
            judge(self.w)

    def teardown(self) -> None:
        if hasattr(self, "w"):
            self.w.teardown()
            judge(self.w)


class MainlineOnOurMachines(ApiMachine):
    design = "base"
    profile = "x86_64-kvm_pvm-6.18"


class FilemapOnArm64(ApiMachine):
    design = "filemap"
    profile = "arm64"


SETTINGS = settings(max_examples=10, stateful_step_count=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
TestV12 = ApiMachine.TestCase
TestV12.settings = SETTINGS
TestMainline = MainlineOnOurMachines.TestCase
TestMainline.settings = SETTINGS
TestFilemapArm64 = FilemapOnArm64.TestCase
TestFilemapArm64.settings = SETTINGS
