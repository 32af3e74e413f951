"""Per-day, per-model usage totals of an account, for the overview's charts.

Completed UTC days do not change (rows are flushed a second or so after their request), so their
totals are read from the store once per account and day, then kept (``DayTotals``, a bounded LRU);
only today's rows are aggregated on every view. The store's own ``usage_totals`` computes them,
so the figures are the admin API's (``/usage/totals``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta

from nexgate_proxy.store import Store, UsageTotal

HISTORY_DAYS = 90
MAX_ACCOUNTS = 512
OTHER = "other"

Cell = tuple[int, int, int, int]
"""(requests, prompt tokens, completion tokens, cost pico)."""


def _cell(t: UsageTotal) -> Cell:
    return (t.requests, t.prompt_tokens, t.completion_tokens, t.cost_pico)


def _minus(a: Cell, b: Cell) -> Cell:
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2], a[3] - b[3])


@dataclass
class History:
    """Totals by (day 'YYYY-MM-DD', model) of the completed days from ``start`` to ``today`` (excluded);
    ``start == today`` until a view asks for some."""
    start: date
    today: date
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)


async def _days_by_model(store: Store, account_id: str, since: datetime, until: datetime | None) -> dict[tuple[str, str], Cell]:
    cells: dict[tuple[str, str], Cell] = {}
    models = await store.usage_totals(account_id=account_id, since=since, until=until, group_by="model")
    if len(models) == 1 and models[0].group:  # one model: its days are the account's days
        days = await store.usage_totals(account_id=account_id, since=since, until=until, group_by="day")
        return {(t.group, models[0].group): _cell(t) for t in days}
    everything = {t.group: _cell(t) for t in
                  await store.usage_totals(account_id=account_id, since=since, until=until, group_by="day")}
    for model in models:
        if not model.group:
            continue  # rows without a model: what the named models leave over
        for t in await store.usage_totals(account_id=account_id, model=model.group, since=since, until=until,
                                          group_by="day"):
            cells[(t.group, model.group)] = _cell(t)
            everything[t.group] = _minus(everything[t.group], _cell(t))
    for day, rest in everything.items():
        if rest[0] > 0:
            cells[(day, "")] = rest
    return cells


class DayTotals:
    def __init__(self, max_accounts: int = MAX_ACCOUNTS) -> None:
        self._histories: OrderedDict[str, History] = OrderedDict()
        self._max = max_accounts

    async def cells(self, store: Store, account_id: str, now: datetime,
                    days: int = HISTORY_DAYS) -> dict[tuple[str, str], Cell]:
        """The last ``days`` days (today included) of the account, by (day, model). Older days read
        before (a 90-day view after a 30-day one) stay; only the days not read yet are read."""
        today = now.astimezone(UTC).date()
        midnight = datetime.combine(today, time(), UTC)
        start = today - timedelta(days=min(days, HISTORY_DAYS) - 1)
        history = self._histories.get(account_id)
        if history is None or history.today != today:
            history = History(today, today)
            self._histories[account_id] = history
        if start < history.start:
            history.cells.update(await _days_by_model(
                store, account_id, datetime.combine(start, time(), UTC),
                datetime.combine(history.start, time(), UTC)))
            history.start = start
        self._histories.move_to_end(account_id)
        while len(self._histories) > self._max:
            self._histories.popitem(last=False)
        today_text = today.isoformat()  # one day: its totals by model are its cells
        latest = await store.usage_totals(account_id=account_id, since=midnight, group_by="model")
        first = start.isoformat()
        return {**{k: v for k, v in history.cells.items() if k[0] >= first},
                **{(today_text, t.group): _cell(t) for t in latest}}
