"""Units attributes compared as units, not as text: the spellings tools write for one unit
agree, other units do not."""
import pytest

from pipeline.units import same_units


@pytest.mark.parametrize("a, b", [("m s-1", "m/s"), ("m s**-1", "m s-1"), ("m  s-1", "m s-1"),
                                  ("s-1 m", "m s-1"), ("K", "kelvin"), ("degC", "degrees_C"),
                                  ("1", "dimensionless"), ("1/s", "s-1"), ("kg/m2", "kg m-2"),
                                  ("m s^-1", "m s-1")])
def test_spellings_of_one_unit_are_the_same(a, b):
    assert same_units(a, b)


@pytest.mark.parametrize("a, b", [("K", "degC"), ("Pa", "hPa"), ("m s-1", "m s-2"),
                                  ("m", "km"), ("1", "m")])
def test_other_units_differ(a, b):
    assert not same_units(a, b)
