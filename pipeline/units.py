"""Whether two ``units`` attributes name the same unit, whatever their spelling.

Fields of one quantity come from several tools: ``m s-1`` (CF), ``m/s``, ``m s**-1`` (ECMWF),
``K`` and ``kelvin``. piadm refuses to line up fields whose units differ (a truth in degC
scored against an ensemble in K gave a CRPS of 271 labelled K), so it must not refuse these.
No units library: the spellings below, compared as a set of factors, order aside.
"""
from __future__ import annotations

import re

# whole spellings of one unit (lower case)
SYNONYMS = {
    **dict.fromkeys(("kelvin", "kelvins", "degk", "deg k", "deg_k", "degrees_k", "degree_k"),
                    "k"),
    **dict.fromkeys(("degc", "deg c", "deg_c", "degrees_c", "degree_c", "degrees_celsius",
                     "degree_celsius", "celsius", "°c"), "degc"),
    **dict.fromkeys(("", "1", "dimensionless", "none", "-"), "1"),
}


def units_key(text) -> str:
    """``text`` (a units attribute) as its factors in one spelling: ``m/s`` and ``m s**-1``
    give ``m s-1``."""
    s = str(text).strip().lower()
    s = SYNONYMS.get(s, s)
    s = re.sub(r"\*\*|\^", "", s)  # m s**-1, m s^-1: an exponent as CF writes it
    if s.count("/") == 1:  # m/s, kg/m2: the divisor's factors to the power -1
        num, den = s.split("/")
        den = " ".join(f"{f}-1" if re.fullmatch(r"[a-z]+", f) else
                       re.sub(r"^([a-z]+)(\d+)$", r"\1-\2", f) for f in den.split())
        s = f"{num} {den}"
    factors = [f for f in re.sub(r"[\s.*·]+", " ", s).split() if f != "1"]  # 1/s is s-1
    return " ".join(sorted(factors)) or "1"


def same_units(a, b) -> bool:
    """Whether units attributes ``a`` and ``b`` name the same unit (see ``units_key``)."""
    return units_key(a) == units_key(b)
