"""Relative times an agent writes naturally ("yesterday", "last week", "3 days ago") as Unix seconds.

A phrase names a span of time: ``since`` takes its start and ``until`` its end, so ``since: "yesterday"``
begins at midnight yesterday and ``until: "yesterday"`` stops at midnight today. "last week" and "N days
ago" are points in time (now minus the amount): agents mean "the past seven days", not a calendar week.
Days start at local midnight of the server (the appliance's configured time zone). Anything else - ISO-8601,
Unix seconds, or text the engine refuses - is passed through unchanged for the engine to judge.
"""
from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any, Callable, Optional, Tuple

_UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 7 * 86400,
                 "month": 30 * 86400, "year": 365 * 86400}
_WORD_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
                 "seven": 7, "eight": 8, "nine": 9, "ten": 10, "a few": 3, "few": 3, "several": 3}
_UNIT = r"(second|minute|hour|day|week|month|year)s?"
_AMOUNT = r"(\d{1,6}|a few|few|several|an?|one|two|three|four|five|six|seven|eight|nine|ten)"
_AGO = re.compile(rf"^{_AMOUNT}\s+{_UNIT}\s+ago$")
_LAST = re.compile(rf"^(?:last|past|the last|the past)\s+(?:{_AMOUNT}\s+)?{_UNIT}$")


def _span(phrase: str, now: datetime) -> Optional[Tuple[float, float]]:
    """(start, end) in Unix seconds of a relative phrase, or None when it is not one."""
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    text = " ".join(phrase.strip().lower().split())
    if text in ("now", "today"):
        return (midnight.timestamp() if text == "today" else now.timestamp()), now.timestamp()
    if text == "yesterday":
        return (midnight - timedelta(days=1)).timestamp(), midnight.timestamp()
    match = _AGO.match(text) or _LAST.match(text)
    if match is None:
        return None
    amount_text, unit = match.group(1), match.group(2)
    amount = 1 if amount_text is None else _WORD_NUMBERS.get(amount_text) or int(amount_text)
    point = now.timestamp() - amount * _UNIT_SECONDS[unit]
    return point, point


def resolve_time(value: Any, edge: str, clock: Callable[[], datetime] = lambda: datetime.now().astimezone()
                 ) -> Any:
    """``value`` as Unix seconds when it is a relative phrase (``edge`` "since" = start, "until" = end)."""
    if not isinstance(value, str):
        return value
    span = _span(value, clock())
    if span is None:
        return value
    return span[0] if edge == "since" else span[1]
