"""Counting windows and the names of the shared counters that hold them.

Budgets count per UTC day or UTC month, rate limits per UTC minute (fixed
windows: a burst straddling two minutes may see up to twice the per-minute
limit in sixty seconds). Every gateway process derives the same counter name
for the same window, so the counters in the database are shared by all.
"""

from __future__ import annotations

from datetime import UTC, datetime

PERIOD_MINUTE = "minute"
#: What a counter counts: tokens, US dollars, or requests.
COUNT_TOKENS = "tokens"
COUNT_USD = "usd"
COUNT_REQUESTS = "requests"


def window(period: str, at: float) -> tuple[float, float]:
    """(start, end) in epoch seconds of the ``period`` ("minute", "day", "month") holding ``at``."""
    if period == PERIOD_MINUTE:
        start = at - at % 60
        return start, start + 60
    moment = datetime.fromtimestamp(at, UTC)
    if period == "day":
        begin = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        return begin.timestamp(), begin.timestamp() + 86400
    if period == "month":
        begin = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        after = (
            begin.replace(year=begin.year + 1, month=1)
            if begin.month == 12
            else begin.replace(month=begin.month + 1)
        )
        return begin.timestamp(), after.timestamp()
    raise ValueError(f"unknown period {period!r}")


def counter_key(
    org_id: int, counts: str, period: str, window_start: float, scope: str, subject: str
) -> str:
    """The shared counter's name: the same in every process for the same window."""
    return f"{org_id}|{counts}|{period}|{int(window_start)}|{scope}|{subject}"


def budget_counter(
    org_id: int, scope: str, subject: str, metric: str, period: str, at: float
) -> tuple[str, str, float]:
    """The counter a budget (``metric`` "tokens" or "usd" per ``period``) is judged by at
    ``at``, what it counts, and the end of its window: the proxy counts into it, the
    views read it."""
    start, end = window(period, at)
    counts = COUNT_USD if metric == COUNT_USD else COUNT_TOKENS
    return counter_key(org_id, counts, period, start, scope, subject), counts, end


def minute_counters(org_id: int, scope: str, subject: str, at: float) -> tuple[str, str, float]:
    """The requests and tokens counters of a rate limit at ``at``, and the minute's end."""
    start, end = window(PERIOD_MINUTE, at)
    return (
        counter_key(org_id, COUNT_REQUESTS, PERIOD_MINUTE, start, scope, subject),
        counter_key(org_id, COUNT_TOKENS, PERIOD_MINUTE, start, scope, subject),
        end,
    )
