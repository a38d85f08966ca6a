"""Backend-agnostic conformance scenarios: the same cases run on the model and on the twin."""

from gmemlab.conformance import vmm  # registers the VMM-call cases into CASES
from gmemlab.conformance.cases import CASES, Case, Outcome, Unsupported, run_case

__all__ = ["CASES", "Case", "Outcome", "Unsupported", "run_case", "vmm"]
