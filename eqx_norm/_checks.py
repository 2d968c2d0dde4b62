"""Argument checks shared by the layer, the SAM family and the tools: each names the
argument, says what was wrong and shows a value that works."""

from typing import Any

import jax
import numpy as np

# The largest count an int32 step counter can reach.
INT32_MAX = int(np.iinfo(np.int32).max)


def _concrete(value: Any) -> np.ndarray | None:
    """`value` as a NumPy array, or `None` where it is traced (checked by no one
    at trace time, as in Optax)."""
    try:
        return np.asarray(value)
    except jax.errors.TracerArrayConversionError:
        return None


def as_int(name: str, value: Any, example: str) -> int:
    """`value` as a Python int: a Python, NumPy or concrete JAX integer scalar of
    any integer type, but not a bool. A `TypeError` naming the argument otherwise."""
    array = None if isinstance(value, (bool, np.bool_, str, bytes)) else value
    array = _concrete(array) if array is not None else None
    if array is None or array.ndim != 0 or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(
            f"`{name}` must be an int, got {value!r} of type {type(value).__name__}; "
            f"e.g. `{example}`."
        )
    return int(array)


def positive_int(
    name: str, value: Any, example: str, *, maximum: int | None = None
) -> int:
    """`value` as a Python int in [1, `maximum`]: a `TypeError` for a non-integer
    (bools included), a `ValueError` naming the argument for one out of range."""
    number = as_int(name, value, example)
    if number < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}; e.g. "
                         f"`{example}`.")
    if maximum is not None and number > maximum:
        raise ValueError(
            f"`{name}` must be at most {maximum}, got {value!r}; e.g. `{example}`."
        )
    return number


def real_scalar(name: str, value: Any) -> float:
    """`value` as a Python float: a real Python, NumPy or concrete JAX scalar, not a
    bool, string or complex number. A `TypeError` naming the argument otherwise."""
    array = None if isinstance(value, (bool, np.bool_, str, bytes)) else value
    array = _concrete(array) if array is not None else None
    if (
        array is None
        or array.ndim != 0
        or not (
            np.issubdtype(array.dtype, np.integer)
            or np.issubdtype(array.dtype, np.floating)
        )
    ):
        raise TypeError(
            f"`{name}` must be a real number, got {value!r} of type "
            f"{type(value).__name__}."
        )
    return float(array)


def non_negative(name: str, value: Any, example: str, *, schedule: bool = True) -> None:
    """A `ValueError` if `value` is a concrete real scalar (Python, NumPy or a JAX
    array that is not traced) that is NaN, infinite or negative; a `TypeError` if it
    is not a real scalar (or, with `schedule=True`, a callable of the step count).
    Traced values (under `optax.inject_hyperparams`) are checked by no one, as in
    Optax."""
    accepted = "a real scalar or a schedule" if schedule else "a real scalar"
    if callable(value):
        if schedule:
            return
        raise TypeError(
            f"`{name}` must be {accepted}, got the callable {value!r}; "
            f"e.g. `{name}={example}`."
        )
    if isinstance(value, (bool, np.bool_, str, bytes)):
        raise TypeError(
            f"`{name}` must be {accepted}, got {value!r}; e.g. `{name}={example}`."
        )
    number = _concrete(value)
    if number is None:
        return
    if number.ndim != 0 or not np.issubdtype(number.dtype, np.number):
        raise TypeError(
            f"`{name}` must be {accepted}, got {value!r}; e.g. `{name}={example}`."
        )
    if np.iscomplexobj(number) or not (np.isfinite(number) and number >= 0):
        raise ValueError(
            f"`{name}` must be finite and at least 0, got {value!r}; "
            f"e.g. `{name}={example}`."
        )
