"""Cron expressions as `monitor.retrain_cron` takes them, checked when params.yaml is read.

Prefect reads the schedule only when the retrain deployment is created; checking it here makes a typo such as
`daily` fail with the key's name before anything runs. The grammar is standard cron's, which Prefect accepts
(tests/test_params_checks.py compares the two); Prefect's own extensions (L, #, ?, a seconds field) are not.
"""

from __future__ import annotations

import re

ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
# name, smallest and largest value, names standing for values from the smallest on
FIELDS = (("minute", 0, 59, ()), ("hour", 0, 23, ()), ("day of month", 1, 31, ()), ("month", 1, 12, MONTHS),
          ("day of week", 0, 7, WEEKDAYS))
ITEM = re.compile(r"(?P<range>\*|(?P<low>\w+)(-(?P<high>\w+))?)(/(?P<step>\d+))?")
FORMAT = ("5 fields, minute hour day-of-month month day-of-week, each *, a number, a range (1-5), a list (1,15) "
          "or a step (*/15), months and weekdays also by name (jan, mon); or one of " + ", ".join(ALIASES))


def cron_problem(expression: str) -> str | None:
    """What is wrong with a cron expression, as a sentence; None when it is valid."""
    if expression.strip().lower() in ALIASES:
        return None
    fields = expression.split()
    if len(fields) != len(FIELDS):
        return f"has {len(fields)} field{'' if len(fields) == 1 else 's'}: a cron expression has {FORMAT}"
    for text, (name, low, high, names) in zip(fields, FIELDS):
        if not all(_valid_item(item, low, high, names) for item in text.split(",")):
            return f"the {name} field {text!r} is not {low}-{high}{' or a name' if names else ''}: expected {FORMAT}"
    return None


def _valid_item(item: str, low: int, high: int, names: tuple[str, ...]) -> bool:
    match = ITEM.fullmatch(item.lower())
    if match is None or match["step"] == "0":
        return False
    if match["range"] == "*":
        return True
    ends = [_value(match["low"], names, low), _value(match["high"] or match["low"], names, low)]
    return None not in ends and low <= ends[0] <= ends[1] <= high


def _value(text: str, names: tuple[str, ...], low: int) -> int | None:
    if text.isdigit():
        return int(text)
    return names.index(text) + low if text in names else None
