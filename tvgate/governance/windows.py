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
