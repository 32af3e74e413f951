"""Per-day stacked bar charts as inline SVG: no script, readable by screen readers.

Each chart has a title and a one-line summary (``role="img"``, ``aria-label``), each bar segment a
``<title>`` (the day, the model, the value), and the page shows the same numbers in a table too.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Callable, Mapping, Sequence

from .markup import Safe, escape, html, join

PALETTE = ("#4f46e5", "#0891b2", "#16a34a", "#d97706", "#db2777", "#64748b")
WIDTH, HEIGHT, LEFT, BOTTOM, TOP = 720, 200, 56, 22, 10


def days_back(today: date, count: int) -> list[str]:
    return [(today - timedelta(days=count - 1 - i)).isoformat() for i in range(count)]


def stacked_bars(title: str, days: Sequence[str], series: Mapping[str, Mapping[str, int]],
                 fmt: Callable[[int], str]) -> Safe:
    """``series``: name -> {day: value}. Bars per day, one stacked segment per series, in order."""
    names = list(series)
    totals = [sum(series[n].get(d, 0) for n in names) for d in days]
    peak = max(totals, default=0)
    total = sum(totals)
    label = f"{title}: {fmt(total)} over {len(days)} days, highest day {fmt(peak)}"
    if peak <= 0:
        return html('<figure class="chart"><figcaption>{t}</figcaption><p class="empty">Nothing yet in this '
                    'period.</p></figure>', t=title)
    plot_w, plot_h = WIDTH - LEFT - 8, HEIGHT - BOTTOM - TOP
    step = plot_w / max(len(days), 1)
    bar = max(step * 0.8, 1.0)
    parts: list[Safe] = []
    for frac in ((0, 0.5, 1) if peak > 1 else (0, 1)):
        y = TOP + plot_h * (1 - frac)
        parts.append(html('<line x1="{x1}" x2="{x2}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                          '<text x="{tx}" y="{ty:.1f}" class="axis" text-anchor="end">{v}</text>',
                          x1=LEFT, x2=WIDTH - 8, y=y, tx=LEFT - 6, ty=y + 4, v=fmt(int(peak * frac))))
    for i, day in enumerate(days):
        x = LEFT + i * step + (step - bar) / 2
        base = TOP + plot_h
        for index, name in enumerate(names):
            value = series[name].get(day, 0)
            if value <= 0:
                continue
            h = plot_h * value / peak
            base -= h
            # the hot loop (days x models): plain f-string, the only text escaped by hand
            parts.append(Safe(f'<rect x="{x:.1f}" y="{base:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                              f'fill="{PALETTE[index % len(PALETTE)]}"><title>{escape(day)} · {escape(name)}: '
                              f'{escape(fmt(value))}</title></rect>'))
        if i % max(len(days) // 6, 1) == 0:
            parts.append(html('<text x="{x:.1f}" y="{y}" class="axis">{d}</text>', x=x, y=HEIGHT - 6, d=day[5:]))
    legend = join(html('<li><svg class="swatch" viewBox="0 0 10 10" aria-hidden="true"><rect width="10" height="10" '
                       'fill="{c}"/></svg>{n}</li>',
                       c=PALETTE[i % len(PALETTE)], n=n) for i, n in enumerate(names))
    return html('<figure class="chart"><figcaption>{t}</figcaption>'
                '<svg viewBox="0 0 {w} {h}" role="img" aria-label="{label}" preserveAspectRatio="none">{parts}</svg>'
                '<ul class="legend">{legend}</ul></figure>',
                t=title, w=WIDTH, h=HEIGHT, label=label, parts=join(parts), legend=legend)
