"""The metric names a PromQL expression reads, so a test can check each one exists in a
real scrape (a renamed metric would otherwise leave a dashboard panel silently empty).

Not a parser: PromQL's metric names are its identifiers once strings, label matchers,
range and subquery brackets, grouping clauses, functions, keywords and numbers are taken
out; that is all the dashboards here use.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Final

_STRING: Final = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES: Final = re.compile(r"\{[^{}]*\}")
_BRACKETS: Final = re.compile(r"\[[^\[\]]*\]")
_GROUPING: Final = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE)
_IDENTIFIER: Final = re.compile(r"(?<![\w.$:])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS: Final = frozenset({
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan", "start", "end",
    # aggregation operators, also written ``sum by (x) (...)`` (no parenthesis next)
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
})
_LABEL_VALUES: Final = re.compile(r"label_values\(\s*([A-Za-z_:][\w:]*)")


def metric_names(expr: str) -> set[str]:
    """Every metric ``expr`` reads (``rate(x_total{a="b"}[5m])`` -> {"x_total"})."""
    text = _STRING.sub(" ", expr)
    while True:
        stripped = _BRACES.sub(" ", _BRACKETS.sub(" ", text))
        if stripped == text:
            break
        text = stripped
    text = _GROUPING.sub(" ", text)
    names: set[str] = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def dashboard_metrics(board: dict[str, Any]) -> set[str]:
    """Every metric a dashboard's panels and variables read."""
    names: set[str] = set()
    for expr in _expressions(board):
        names |= metric_names(expr)
    return names


def _expressions(board: dict[str, Any]) -> Iterable[str]:
    for panel in _panels(board.get("panels", [])):
        for target in panel.get("targets", []):
            yield target["expr"]
    for variable in board.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            match = _LABEL_VALUES.search(variable.get("definition", ""))
            if match:
                yield match.group(1)


def _panels(panels: list[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))
