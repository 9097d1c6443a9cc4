"""Item labels as a person writes them and as a coordinate holds them: ``label_text`` writes
a label (a date, a lead time, a float to 15 digits), ``label_value`` reads a config's label
back on a coordinate's own type (datetime64 without a time zone, timedelta, exact integers,
floats snapped to the coordinate's value, cftime dates on their own calendar).
"""
from __future__ import annotations

import decimal
import math
import re
import warnings
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import InputError

if TYPE_CHECKING:
    import xarray as xr


def label_text(label) -> str:
    """An item label as a person writes it: 2020-01-01, 2020-01-01 06:00:00 or (a lead
    time) 0 days 06:00:00, where numpy prints nanoseconds or a count of them (a cftime date
    alike, on its own calendar); a float to 15 digits, which a label typed so names
    (``LABEL_RTOL``); other numbers and text as they are."""
    kind = np.asarray(label).dtype.kind
    if kind == "f" and np.asarray(label).dtype.itemsize >= 8:
        # 2.5, not the 2.5000000000000004 of a sum of steps (typed, labels snap to it)
        return str(float(f"{float(label):.15g}"))
    if isinstance(label, bytes):  # a netCDF char array's: as its text
        return label.decode(errors="replace")
    if kind not in "mM":
        text = str(label)
        return text.removesuffix(" 00:00:00") if hasattr(label, "calendar") else text
    import pandas as pd

    value = pd.Timedelta(label) if kind == "m" else pd.Timestamp(label)
    text = str(value)
    return text.removesuffix(" 00:00:00") if kind == "M" else text


# A float label names the coordinate value this close to it, relative to its size: times
# made as spinup + interval * k carry their sums' rounding (1.7000000000000002 for "1.7")
LABEL_RTOL = 1e-9


def snapped(value: float, values: np.ndarray) -> float:
    """``value``, or the one of ``values`` (any shape) within ``LABEL_RTOL`` of it (a label
    written 3.0000000000001 elsewhere) where there is one."""
    if values.size and math.isfinite(value):  # inf lies within any relative tolerance
        nearest = values.flat[np.abs(values - value).argmin()]
        if abs(nearest - value) <= LABEL_RTOL * max(1.0, abs(value)):
            return nearest
    return value


# YYYY-MM-DD, then the hour (and minutes, and seconds) after a space or a T, as numpy reads
# a datetime64's ("2000-01-04T06" was refused on a noleap calendar, taken on a Gregorian one)
CALENDAR_DATE = re.compile(r"(-?\d{1,4})-(\d{1,2})-(\d{1,2})"
                           r"(?:[ T](\d{1,2})(?::(\d{2})(?::(\d{2}))?)?)?")


def _calendar_date(text: str, kind, calendar: str):
    """``text`` as a date of cftime class ``kind`` on ``calendar``, read field by field (not
    through numpy's Gregorian dates, which hold no 30 February of a 360-day year, nor a year
    0); ValueError for text that is no such date."""
    found = CALENDAR_DATE.fullmatch(text.strip())
    if found is None:
        raise ValueError(text)
    parts = [int(p) if p else 0 for p in found.groups()]
    return kind(*parts, calendar=calendar)


# a time-zone designator ending a date and time: Z, +02, -0530, +05:30
TIME_ZONE = re.compile(r"(?<=\d)(Z|[+-]\d\d(:?\d\d)?)$", re.IGNORECASE)


def _datetime(text: str, name, key: str) -> np.datetime64:
    """``text`` as a date and time of a datetime64 coordinate, which holds no time zone: a
    label with one is refused, naming its UTC equivalent (numpy converted it with a warning,
    as though every archive's times were UTC)."""
    timed = re.search(r"\d[T ]\d", text.strip(), re.IGNORECASE)  # a date and a time
    zone = TIME_ZONE.search(text.strip()) if timed else None
    if zone is not None:
        from pipeline.warned import catching

        with catching():
            warnings.simplefilter("ignore")
            utc = np.datetime64(text.strip())
            if np.datetime_data(utc.dtype)[0] in ("h", "D"):  # an offset of minutes: kept
                utc = np.datetime64(text.strip(), "m")
        raise InputError(f"{key}: label {text!r} has a time zone ({zone.group(0)}), which the "
                         f"{name} coordinate's times do not hold: give the time as the "
                         f"coordinate counts it, e.g. {str(utc)!r} where that is UTC")
    return np.datetime64(text)


def label_value(text: str, coord: xr.DataArray, key: str):
    """A config label (a string) as a value of ``coord``'s dtype; a float one as the
    coordinate's own value within ``LABEL_RTOL`` of it, where there is one. ``key``: the
    setting that gave it, named by the error for a label that is none."""
    kind, calendar = coord.dtype.kind, None
    try:
        if kind == "M":
            return _datetime(text, coord.name, key)
        if kind == "m":  # lead times: "6h", "1 days 06:00:00"
            import pandas as pd

            return pd.to_timedelta(text).to_timedelta64()
        if kind in "iu":  # "20.0" is 20, as "25" is 25.0 on a float coordinate
            try:  # exactly: a nanosecond count is past what a float holds
                if "_" in text:  # Decimal reads "20_0" as 200
                    raise ValueError(text)
                value = decimal.Decimal(text.strip())
                if not value.is_finite() or value % 1 != 0:
                    raise ValueError(text)
            except decimal.InvalidOperation:  # not a number, or past what it divides
                raise ValueError(text) from None
            return int(value)
        if kind == "f":
            return snapped(float(text), np.asarray(coord.values))
        if kind == "S":  # bytes, as a netCDF char array's labels come: none equals text
            return text.encode()
        calendar = getattr(coord.values.flat[0], "calendar", None) if coord.size else None
        if kind == "O" and calendar:  # a cftime date, on the coordinate's own calendar
            return _calendar_date(text, type(coord.values.flat[0]), calendar)
    except InputError:
        raise
    except ValueError:
        form = (f", a date of its {calendar} calendar: YYYY-MM-DD, then HH, HH:MM or HH:MM:SS "
                "after a space or a T" if kind == "O" and calendar else "")
        first = f", e.g. {label_text(coord.values.flat[0])!r}" if coord.size else ""
        raise InputError(f"{key}: label {text!r} is not a valid {coord.name} value "
                         f"(dtype {coord.dtype}{form}): give one of its labels{first}"
                         ) from None
    return text
