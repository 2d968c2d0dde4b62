"""Argument checks shared by the layer, the SAM family and the tools: each names the
argument, says what was wrong and shows a value that works."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

# The largest count an int32 step counter can reach.
INT32_MAX = int(np.iinfo(np.int32).max)


def concrete(value: Any) -> np.ndarray | None:
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
    array = concrete(array) if array is not None else None
    if array is None or array.ndim != 0 or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(
            f"`{name}` must be an int, got {value!r} of type {type(value).__name__}; "
            f"e.g. `{example}`."
        )
    return int(array)


def boolean(name: str, value: Any) -> bool:
    """`value` as a Python bool: a bool or NumPy bool only (not `0`, `1` or `None`,
    which would read as a choice). A `TypeError` naming the argument otherwise."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"`{name}` must be True or False, got {value!r} of type "
            f"{type(value).__name__}; for example `{name}=True`."
        )
    return bool(value)


def positive_int(
    name: str, value: Any, example: str, *, maximum: int | None = None
) -> int:
    """`value` as a Python int in [1, `maximum`]: a `TypeError` for a non-integer
    (bools included), a `ValueError` naming the argument for one out of range."""
    number = as_int(name, value, example)
    if number < 1:
        raise ValueError(
            f"`{name}` must be a positive int, got {value!r}; e.g. `{example}`."
        )
    if maximum is not None and number > maximum:
        raise ValueError(
            f"`{name}` must be at most {maximum}, got {value!r}; e.g. `{example}`."
        )
    return number


def real_scalar(name: str, value: Any) -> float:
    """`value` as a Python float: a real Python, NumPy or concrete JAX scalar, not a
    bool, string or complex number. A `TypeError` naming the argument otherwise."""
    array = None if isinstance(value, (bool, np.bool_, str, bytes)) else value
    array = concrete(array) if array is not None else None
    if (
        array is None
        or array.ndim != 0
        or not (
            jnp.issubdtype(array.dtype, jnp.integer)
            or jnp.issubdtype(array.dtype, jnp.floating)
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
    number = concrete(value)
    if number is None:
        return
    # `jnp.issubdtype`: NumPy does not count bfloat16 and the float8s as numbers.
    if number.ndim != 0 or not jnp.issubdtype(number.dtype, jnp.number):
        raise TypeError(
            f"`{name}` must be {accepted}, got {value!r}; e.g. `{name}={example}`."
        )
    if np.iscomplexobj(number) or not (np.isfinite(number) and number >= 0):
        raise ValueError(
            f"`{name}` must be finite and at least 0, got {value!r}; "
            f"e.g. `{name}={example}`."
        )
    with np.errstate(over="ignore"):
        in_float32 = np.asarray(number, np.float32)
    if not np.isfinite(in_float32):
        raise ValueError(
            f"`{name}` must be finite in float32, the dtype it is used in, got "
            f"{value!r} (above {float(np.finfo(np.float32).max):.4g}); "
            f"e.g. `{name}={example}`."
        )


def non_negative_at_run_time(name: str, value: Any, who: str) -> Any:
    """`value`, a hyperparameter as an update uses it: a Python or NumPy number is
    returned as it is (checked when the optimizer was made); a JAX array (a
    schedule's value, or one injected by `optax.inject_hyperparams`, traced under
    `jit`) is checked when it runs (`eqx.error_if`), so that a NaN, infinite or
    negative value stops the update instead of making every parameter NaN or
    ascending."""
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        return value
    kind = getattr(value, "dtype", None)
    if kind is None or not jnp.issubdtype(kind, jnp.number) or jnp.ndim(value):
        raise TypeError(
            f"`eqx_norm.{who}`: `{name}` must be a real scalar at every update, but "
            f"its schedule (or `optax.inject_hyperparams`) gave {value!r}; a "
            f"schedule returns one number, e.g. `{name}=optax.cosine_decay_schedule("
            "0.05, steps)`."
        )
    value = jnp.asarray(value)
    return eqx.error_if(
        value,
        ~(jnp.isfinite(value) & (value >= 0)),
        f"`eqx_norm.{who}`: `{name}` is NaN, infinite or negative at this update "
        f"(from its schedule, called with the update count `steps` of the "
        f"optimizer state given to this update, or injected by "
        f"`optax.inject_hyperparams`). It must be finite and at least 0 at every "
        f"step: check the schedule, e.g. `{name}=optax.cosine_decay_schedule(0.05, "
        "steps)`.",
    )


def flag(name: str, value: Any) -> Any:
    """`value` as a flag a transformation reads when it runs: a Python or NumPy
    bool, or a boolean scalar array (one `optax.inject_hyperparams` injects, traced
    or not). A `TypeError` naming the argument otherwise."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    kind = getattr(value, "dtype", None)
    if kind is not None and jnp.dtype(kind) == jnp.bool_ and jnp.ndim(value) == 0:
        return value
    raise TypeError(
        f"`{name}` must be True or False, got {value!r}; e.g. `{name}=True`."
    )


def real_statistic(
    name: str, value: Any, size: int, dtype: Any, *, where: str, variance: bool
) -> jax.Array:
    """`value` as a per-channel statistic of shape `(size,)` in the floating `dtype`:
    real numbers (integers are converted exactly, as far as `dtype` holds them),
    finite in `dtype`, and with `variance=True` at least 0.

    A `TypeError` for complex, boolean or non-numeric values and a `ValueError` for
    a wrong shape, at once; for values that are not finite or are negative, a
    `ValueError` at once where they are concrete, and a runtime error
    (`eqx.error_if`) under `jit`, so that no state is ever made from them."""
    known = concrete(value)
    array = value if known is None else known
    real = (jnp.integer, jnp.floating)  # jnp's: NumPy's omit bfloat16
    if not any(jnp.issubdtype(array.dtype, kind) for kind in real):
        raise TypeError(
            f"`{where}`: `{name}` must hold real numbers, got dtype {array.dtype}; "
            "statistics are never complex or boolean. Pass the real per-channel "
            f"values, e.g. `{name}.real` where the imaginary part is 0."
        )
    if array.shape != (size,):
        raise ValueError(
            f"`{where}`: `{name}` has shape {tuple(array.shape)}, but this layer has "
            f"{size} channels: pass shape ({size},)."
        )
    not_finite = (
        f"`{where}`: `{name}` is not finite (NaN or infinity in {jnp.dtype(dtype)}), "
        "and a non-finite statistic would stop every later training step from "
        "updating the state. Pass finite statistics; where the source's are already "
        "corrupted, `eqx_norm.recalibrate` recomputes them from data."
    )
    negative = (
        f"`{where}`: `{name}` has a negative value; pass a variance, not a standard "
        "deviation or a log-variance (e.g. `std**2` or `jnp.exp(log_var)`)."
    )
    if known is None:
        stored = array.astype(dtype)
        stored = eqx.error_if(stored, ~jnp.all(jnp.isfinite(stored)), not_finite)
        if variance:
            stored = eqx.error_if(stored, jnp.any(stored < 0), negative)
        return stored
    with np.errstate(over="ignore"):  # an overflow is reported as not finite
        stored = np.asarray(array, dtype)
    if not np.all(np.isfinite(stored)):
        raise ValueError(not_finite)
    if variance and np.any(stored < 0):
        raise ValueError(negative)
    return jnp.asarray(stored)


def step_count(name: str, value: Any, *, where: str, example: str) -> jax.Array:
    """`value` as an int32 step count in [0, `INT32_MAX`]: a Python, NumPy or JAX
    integer scalar, traced or not, but not a bool. A `TypeError` for any other
    value; a `ValueError` for a concrete one out of range, and a runtime error
    (`eqx.error_if`) for a traced one."""
    if isinstance(value, (bool, np.bool_)) or concrete(value) is not None:
        count = as_int(name, value, example)
        if not 0 <= count <= INT32_MAX:
            raise ValueError(
                f"`{where}`: `{name}` must be from 0 to {INT32_MAX} (an int32 step "
                f"count), got {count}."
            )
        return jnp.asarray(count, jnp.int32)
    if value.ndim != 0 or not jnp.issubdtype(value.dtype, jnp.integer):
        raise TypeError(
            f"`{where}`: `{name}` must be an integer scalar, got a traced array of "
            f"shape {tuple(value.shape)} and dtype {value.dtype}; e.g. `{example}`."
        )
    info = jnp.iinfo(value.dtype)
    out_of_range = jnp.asarray(False)
    if info.min < 0:
        out_of_range = out_of_range | (value < 0)
    if info.max > INT32_MAX:
        out_of_range = out_of_range | (value > INT32_MAX)
    value = eqx.error_if(
        value,
        out_of_range,
        f"`{where}`: `{name}` must be from 0 to {INT32_MAX} (an int32 step count); "
        "a negative or larger count would corrupt the debiasing of the running "
        f"statistics. Pass a count in that range, e.g. `{example}`.",
    )
    return value.astype(jnp.int32)


def count_of(name: str, value: Any, what: str, example: str) -> int:
    """`value` as a positive Python int counting `what`, as `positive_int` takes it;
    both the `TypeError` and the `ValueError` say what the count is of."""
    try:
        return positive_int(name, value, example)
    except (TypeError, ValueError) as error:
        raise type(error)(
            f"`{name}` must be a positive int ({what}), got {value!r}; e.g. "
            f"`{example}`."
        ) from None


def floating_dtype(name: str, dtype: Any, example: str) -> np.dtype:
    """`dtype` as a floating NumPy dtype, or a `ValueError` naming the argument."""
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"`{name}` must be a floating dtype, got {dtype}; e.g. `{example}`."
        )
    return dtype


def momentum_value(value: Any) -> float:
    """`value` as the weight of the old value in a moving average: a real scalar in
    [0, 1). A `TypeError` or `ValueError` naming `momentum` otherwise."""
    number = real_scalar("momentum", value)
    if not 0 <= number < 1:
        raise ValueError(
            f"`momentum` must be in [0, 1), got {number}. It is the weight of "
            "the old value: PyTorch's `momentum=0.1` is `momentum=0.9` here."
        )
    return number


def momentum_below_one(number: float, dtype: Any) -> float:
    """A `ValueError` naming `momentum` if it rounds to 1 in the statistics' `dtype`
    (at 1 the debiasing would divide by zero)."""
    dtype = np.dtype(dtype)
    if not np.asarray(number, dtype) < 1:
        raise ValueError(
            f"`momentum={number!r}` rounds to 1 in the statistics' dtype {dtype}, "
            "which would divide by zero in the running statistics; use a momentum "
            f"below {float(np.nextafter(dtype.type(1), 0))}."
        )
    return number


def channel_axis_of(x: Any, input_size: int, channel_axis: int) -> int:
    """The channel axis of the example `x` of a BatchNorm with `input_size` channels
    on `channel_axis`, as a non-negative int, once `x` is checked: floating-point,
    with that axis, and `input_size` values on it."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"`eqx_norm.BatchNorm` got an input of dtype {x.dtype}; it normalises "
            "floating-point input only (an integer output would truncate the "
            "normalised values). Cast it first, e.g. `x.astype(jnp.float32)`, or "
            "`x / 255.0` for uint8 images."
        )
    layer = f"`eqx_norm.BatchNorm(input_size={input_size}, channel_axis="
    layer += f"{channel_axis})`"
    if not -x.ndim <= channel_axis < x.ndim:
        raise ValueError(
            f"{layer} got an example of shape {tuple(x.shape)}, which has no axis "
            f"{channel_axis}. Pass one example (vmap the layer over the batch axis), "
            "or set `channel_axis` to the axis of the channels."
        )
    axis = channel_axis % x.ndim
    if x.shape[axis] != input_size:
        raise ValueError(
            f"{layer} got an example of shape {tuple(x.shape)}, whose axis {axis} has "
            f"{x.shape[axis]} values, not {input_size}. Check `input_size` and "
            "`channel_axis`, or vmap the layer over the batch axis."
        )
    return axis


def optax_transformation(value: Any, example: str) -> None:
    """A `ValueError` naming `base_optimizer` if `value` is not an Optax gradient
    transformation; `example` is a call that works."""
    import optax

    if not isinstance(value, optax.GradientTransformation):
        raise ValueError(
            "`base_optimizer` must be an Optax gradient transformation, e.g. "
            f"`{example}`; got {type(value)}."
        )


def describe(x: Any) -> str:
    """A short picture of a pytree for an error message: arrays as dtype[shape]."""
    if isinstance(x, eqx.nn.State):
        return "State"
    if isinstance(x, tuple):  # NamedTuples (optimizer states) by their names
        name = type(x).__name__ if hasattr(x, "_fields") else ""
        return name + "(" + ", ".join(describe(a) for a in x) + ")"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in x.items()) + "}"
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{x.dtype}{list(x.shape)}"
    return type(x).__name__
