"""Bar charts drawn on the server as inline SVG: geometry here, markup in chart.html.

No JavaScript and no style attributes (the CSP allows neither inline): sizes are
SVG attributes, colours come from classes in tvgate.css, and each bar carries a
<title> so hovering shows its value. Every label goes through the template's
autoescaping.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tornado.web import UIModule

WIDTH, HEIGHT = 360, 130
TOP, BOTTOM, LEFT = 16, 22, 4


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    title: str


@dataclass(frozen=True, slots=True)
class Chart:
    title: str
    total: str
    peak: str
    bars: tuple[Bar, ...]
    labels: tuple[tuple[float, str, str], ...]  # x, anchor, text
    css: str
    width: int = WIDTH
    height: int = HEIGHT
    baseline: float = HEIGHT - BOTTOM


def _bucket_label(at: float, seconds: int) -> str:
    return time.strftime("%H:%M" if seconds < 86400 else "%b %d", time.gmtime(at))


def bar_chart(
    title: str,
    series: Sequence[dict[str, Any]],
    field: str,
    bucket_seconds: int,
    fmt: Callable[[float], str] = lambda v: f"{v:,.0f}",
    css: str = "",
) -> Chart:
    """One bar per bucket of ``series`` (as services.usage_overview returns it)."""
    values = [float(point[field]) for point in series]
    peak = max(values, default=0.0)
    span = HEIGHT - TOP - BOTTOM
    step = (WIDTH - LEFT) / max(len(values), 1)
    bars = []
    for i, (point, value) in enumerate(zip(series, values, strict=True)):
        height = span * value / peak if peak else 0.0
        # A non-zero value always shows, however small next to the peak.
        if value and height < 1.5:
            height = 1.5
        bars.append(
            Bar(
                x=round(LEFT + i * step + step * 0.1, 2),
                y=round(TOP + span - height, 2),
                width=round(step * 0.8, 2),
                height=round(height, 2),
                title=f"{_bucket_label(point['at'], bucket_seconds)} UTC: {fmt(value)}",
            )
        )
    # A label at the first, middle and last bucket (and no more, so they never collide).
    picks = sorted({0, len(series) // 2, len(series) - 1}) if series else []
    # The first label starts at its bar and the last ends at its bar: none is cut off.
    last = len(series) - 1
    labels = tuple(
        (
            round(LEFT if i == 0 else WIDTH if i == last else LEFT + i * step + step / 2, 2),
            "start" if i == 0 else "end" if i == last else "middle",
            _bucket_label(series[i]["at"], bucket_seconds),
        )
        for i in picks
    )
    return Chart(
        title=title,
        total=fmt(sum(values)),
        peak=fmt(peak),
        bars=tuple(bars),
        labels=labels,
        css=css,
    )


class ChartModule(UIModule):
    """``{% module Chart(chart) %}`` in a template."""

    def render(self, chart: Chart) -> str:
        return self.render_string("chart.html", chart=chart).decode()
