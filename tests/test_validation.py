"""pyrobnn.validation: each check rejects bools, NaN, infinities, wrong types and out-of-range values
with one line naming the argument and the value, and returns the value converted."""
import math
import re
from fractions import Fraction

import numpy as np
import pytest

from pyrobnn import validation as v
from pyrobnn.validation import ArgumentTypeError

INT_CHECKS = [(v.positive_int, 1, 0), (v.non_negative_int, 0, -1)]
FLOAT_CHECKS = [(v.finite_float, -3.5, None), (v.positive_float, 1e-300, 0.0), (v.non_negative_float, 0.0, -1e-9),
                (v.probability, 1.0, 1.5)]


@pytest.mark.parametrize("check,good,bad", INT_CHECKS + FLOAT_CHECKS)
@pytest.mark.parametrize("value", [True, False, "1", None, [1], 1 + 0j])
def test_wrong_types_raise_a_type_error_that_is_also_a_value_error(check, good, bad, value):
    with pytest.raises(ArgumentTypeError, match=rf"^my_arg must be .*, got {re.escape(repr(value))} "):
        check("my_arg", value)
    assert issubclass(ArgumentTypeError, TypeError) and issubclass(ArgumentTypeError, ValueError)


@pytest.mark.parametrize("check,good,bad", INT_CHECKS)
def test_integer_checks(check, good, bad):
    assert check("n", good) == good and type(check("n", good)) is int
    assert check("n", np.int64(good + 5)) == good + 5 and type(check("n", np.int64(good))) is int
    with pytest.raises(ValueError, match=f"^n must be a (positive|non-negative) integer, got {bad}$"):
        check("n", bad)
    for not_int in (1.0, 2.5, float("nan"), float("inf")):
        with pytest.raises(TypeError, match="^n must be"):
            check("n", not_int)


@pytest.mark.parametrize("check,good,bad", FLOAT_CHECKS)
def test_real_checks(check, good, bad):
    assert check("x", good) == good and type(check("x", good)) is float
    assert check("x", 1) == 1.0 and type(check("x", 1)) is float          # ints are real numbers
    assert check("x", np.float32(0.5)) == 0.5 and check("x", Fraction(1, 4)) == 0.25
    for non_finite in (float("nan"), float("inf"), -math.inf):
        with pytest.raises(ValueError, match=rf"^x must be .*, got {non_finite!r}$"):
            check("x", non_finite)
    if bad is not None:
        with pytest.raises(ValueError, match=rf"^x must be .*, got {bad!r}$"):
            check("x", bad)


def test_messages_say_the_range():
    with pytest.raises(ValueError, match=r"^lr must be a positive finite number, got 0$"):
        v.positive_float("lr", 0)
    with pytest.raises(ValueError, match=r"^fraction must be a number in \[0, 1\], got -0.5$"):
        v.probability("fraction", -0.5)
    with pytest.raises(ValueError, match=r"^weight_decay must be a finite number ≥ 0, got -1$"):
        v.non_negative_float("weight_decay", -1)
    with pytest.raises(ValueError, match=r"^max_draws must be an integer ≥ 2, got 1$"):
        v.integer("max_draws", 1, minimum=2)
    with pytest.raises(ValueError, match=r"^k must be an integer in \[1, 4\], got 5$"):
        v.integer("k", 5, minimum=1, maximum=4)
    with pytest.raises(ValueError, match=r"^kl_weight must be a number in \(0, 1\], got 0$"):
        v.real("kl_weight", 0, minimum=0, maximum=1, exclusive_minimum=True)
    with pytest.raises(ValueError, match=r"^c must be a number ≥ 1, got 0.5$"):
        v.real("c", 0.5, minimum=1, finite=False)


def test_infinity_only_where_asked_for():
    assert v.real("threshold", math.inf, finite=False) == math.inf
    assert v.real("c", math.inf, minimum=1, finite=False) == math.inf
    with pytest.raises(ValueError, match="got nan"):
        v.real("threshold", math.nan, finite=False)          # NaN never
    with pytest.raises(ValueError, match="threshold must be a finite number, got inf"):
        v.real("threshold", math.inf)


def test_boolean_and_one_of():
    assert v.boolean("normalize", True) is True and v.boolean("normalize", False) is False
    for bad in (1, 0, "yes", None):
        with pytest.raises(ArgumentTypeError, match=rf"^normalize must be True or False, got {bad!r}"):
            v.boolean("normalize", bad)
    assert v.one_of("mode", "classic", ("classic", "per-draw")) == "classic"
    with pytest.raises(ValueError, match=r"^mode must be one of 'classic', 'per-draw'; got 'other'$"):
        v.one_of("mode", "other", ("classic", "per-draw"))
    with pytest.raises(ValueError, match=r"^mode must be one of 'a'; got \['a'\]$"):
        v.one_of("mode", ["a"], {"a"})                          # unhashable: rejected, not a crash
