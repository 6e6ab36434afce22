"""How long the fault tests' outages and short timeouts last, from the environment.

The defaults are the durations the tests were written and tuned with: CI and
``make test`` run with them. ``TVGATE_TEST_OUTAGE_SCALE`` multiplies every one
(2 on a loaded machine, where a 2 s timeout can fire on a busy gateway rather
than on a silent upstream; below 1 for a quicker local run, at the price of
margins). The tests that live through such outages are marked ``slow``:
``pytest -m "not slow"`` leaves them out of a local run; nothing is skipped by
default.
"""

from __future__ import annotations

import os

SCALE = float(os.environ.get("TVGATE_TEST_OUTAGE_SCALE", "1"))


def outage(seconds: float) -> float:
    """``seconds`` of an outage, a silent upstream or a wait for either, scaled."""
    return seconds * SCALE


def whole_seconds(seconds: int) -> int:
    """A gateway timeout setting that takes whole seconds (TVGATE_IDLE_TIMEOUT), scaled;
    at least 1."""
    return max(1, round(seconds * SCALE))
