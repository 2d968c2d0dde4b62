"""The converters of `BatchNorm`'s fields, each checking one constructor argument,
and the check of its flags when it is called."""

from typing import Any

import jax

from .._checks import as_int, boolean, non_negative, positive_int, real_scalar


def eps_field(value: Any) -> float:
    eps = real_scalar("eps", value)
    non_negative("eps", eps, "1e-5", schedule=False)
    return eps


def channel_axis_field(value: Any) -> int:
    return as_int("channel_axis", value, "channel_axis=-1")


def virtual_batch_size_field(value: Any) -> int | None:
    if value is None:
        return None
    return positive_int("virtual_batch_size", value, "virtual_batch_size=32")


def compute_channels_last_field(value: Any) -> bool:
    return boolean("compute_channels_last", value)


def static_flag(flag, name: str) -> bool:
    """A flag of the layer (`inference`, `compute_channels_last`) as a bool. A
    `TypeError` pointing to `eqx.filter_jit` where it is traced (the model went
    through `jax.jit` as an argument, which traces every leaf, Python bools
    included), and one naming the flag where it is not a bool (`eqx.tree_at` sets
    a field without the constructor's check)."""
    if isinstance(flag, jax.core.Tracer):  # pyright: ignore[reportAttributeAccessIssue]
        raise TypeError(
            f"`eqx_norm.BatchNorm` got an `{name}` flag that is a traced array, "
            "not a bool: the model was passed through `jax.jit` (or another "
            "transformation of all its leaves), which traces every leaf, the flag "
            "included. Use `eqx.filter_jit`, which keeps non-array leaves static, "
            "e.g. `loss = eqx.filter_jit(loss_fn)`; pass `inference=` as a Python "
            "bool."
        )
    return boolean(name, flag)  # set by `eqx.tree_at`, it skipped the converter
