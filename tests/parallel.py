"""How ``make test`` spreads the suite over pytest-xdist workers (``-n N --dist loadgroup``).

Every worker is a test process of its own, as a serial run is: its own fake provider,
session gateways, PostgreSQL databases (named with the worker id: tests/harness.py),
OpenBao dev server, and temporary directories (xdist gives each worker a basetemp of
its own); every server binds a port the kernel chose. What stays to decide is which
tests go together, and that is this module's ``xdist_group`` mark:

- One group per test file and database tier (the session ``database_url`` parameter, and
  any other session or module parameter): a file's module fixtures, and the order its
  tests were written in, stay in one process, as in a serial run; the SQLite and the
  PostgreSQL halves of a file may run at once in two workers. Each worker starts its
  session gateways about once per tier, not once per file (the order below).
- A few files are one group whole (``WHOLE``): their tiers share module state (the
  browser test's record of every page shown, and the screenshots it writes in the tree).
- The groups that take longest start first (``FIRST``: longest processing time first),
  so that the run does not end on one worker with the deploy test still going; then
  every SQLite group, then every PostgreSQL one. pytest's own order goes file by file,
  each file's tiers in turn, and a session gateway is started again at every change of
  tier: in this order a worker changes tier about once.

A run without ``-n`` (one file, a developer's run) is untouched: no mark, no reordering.
"""

from __future__ import annotations

import pytest

#: Files whose tiers must stay in one worker (module state shared across the tiers).
WHOLE = frozenset({"test_ui_browser.py"})

#: Files whose groups take longest (from ``--durations``, slowest first): they start first.
FIRST = (
    "test_deploy.py",
    "test_trace_durability.py",
)


def _distributing(config: pytest.Config) -> bool:
    """In an xdist worker of a ``--dist loadgroup`` run (xdist sets ``loadgroup`` there)."""
    return bool(getattr(config.option, "loadgroup", False))


def group_of(item: pytest.Item) -> str:
    """The file, then the values of the session and module parameters the test runs with."""
    name = item.path.name
    callspec = getattr(item, "callspec", None)
    if name in WHOLE or callspec is None:
        return name
    fixtures = item._fixtureinfo.name2fixturedefs  # type: ignore[attr-defined]
    tiers = [
        str(value)
        for param, value in sorted(callspec.params.items())
        if param in fixtures and fixtures[param][-1].scope in ("session", "package", "module")
    ]
    return "-".join([name, *tiers])


def _rank(item: pytest.Item) -> tuple[int, bool]:
    """``FIRST`` first; then the SQLite tier's groups (and those of no tier) before the
    PostgreSQL tier's, so that a worker switches its session gateway's tier about once."""
    name = item.path.name
    callspec = getattr(item, "callspec", None)
    postgresql = callspec is not None and callspec.params.get("database_url") == "postgresql"
    return (FIRST.index(name) if name in FIRST else len(FIRST), postgresql)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its group (before xdist reads the marks, after collection)."""
    if _distributing(config):
        for item in items:
            item.add_marker(pytest.mark.xdist_group(group_of(item)))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """The items in ``_rank``'s order (the longest groups first, then tier by tier), before xdist
    sends the worker's collection to the scheduler, which queues the groups in that order.
    The sort is stable: every group keeps its tests in the order pytest collected them."""
    if _distributing(session.config):
        session.items.sort(key=_rank)
