"""Number formatting shared by the report text: one place that says how a value is printed."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["fmt_count", "fmt_number", "fmt_pvalue"]

MISSING = "–"


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt_number(x: Any, digits: int = 3) -> str:
    """``x`` with ``digits`` decimals; ``–`` for None/NaN; non-numbers as ``str(x)``."""
    if _missing(x):
        return MISSING
    if isinstance(x, (int, float)):
        return f"{x:.{digits}f}"
    return str(x)


def fmt_count(x: Any, missing: str = MISSING) -> str:
    """A count with an SI suffix and 3 significant digits: ``1.5 M``, ``320 k``, ``12``; ``missing`` for None/NaN."""
    if _missing(x):
        return missing
    x = float(x)
    for div, unit in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.0f}"


def fmt_pvalue(p: Any) -> str:
    """A p-value: 3 decimals, scientific below 1e-3; ``–`` for None/NaN."""
    if _missing(p):
        return MISSING
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"
