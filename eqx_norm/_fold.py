"""Folding inference-mode BatchNorm layers into the linear layer before them, for
serving."""

import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._batch_norm import BatchNorm
from ._from_equinox import equinox_statistics

_FOLDABLE = (eqx.nn.Linear, eqx.nn.Conv, eqx.nn.ConvTranspose)


def _is_norm(x: Any) -> bool:
    return isinstance(x, (BatchNorm, eqx.nn.BatchNorm))


def _affine(bn, state: eqx.nn.State) -> tuple[Array, Array]:
    """`(scale, shift)` per channel: the BatchNorm's inference output is
    `x * scale + shift`."""
    if isinstance(bn, BatchNorm):
        mean, var = bn.statistics(state)
    else:
        mean, var, _ = equinox_statistics(bn, state)
    scale = jax.lax.rsqrt(var + bn.eps)
    if bn.weight is not None and bn.bias is not None:
        scale = scale * bn.weight.astype(scale.dtype)
        return scale, bn.bias.astype(scale.dtype) - mean * scale
    return scale, -mean * scale


def _describe(x: Any) -> str:
    return type(x).__name__


def fold_into(layer, bn, state: eqx.nn.State):
    """Fold one BatchNorm's inference-mode normalisation into the layer before it.

    `bn(layer(x))` in inference mode is `folded(x)`, computed in the layer's dtype:
    the weight of each output channel is scaled by `weight / sqrt(var + eps)` of the
    BatchNorm, and the bias becomes the BatchNorm's affine map of the old bias (a
    layer without a bias gains one).

    **Arguments:**

    - `layer`: an `eqx.nn.Linear`, `eqx.nn.Conv` (any dimension, stride, padding,
        dilation or `groups`) or `eqx.nn.ConvTranspose`.
    - `bn`: the [`eqx_norm.BatchNorm`][] (any approach; its inference statistics
        are used) or `eqx.nn.BatchNorm` applied to that layer's output, normalising
        its output channels.
    - `state`: the state holding the BatchNorm's statistics.

    **Returns:**

    The folded layer, of the same type as `layer`.

    **Raises:**

    A `TypeError` for a layer or BatchNorm of another type, and a `ValueError` if
    the BatchNorm's channels are not the layer's output channels.
    """
    if not isinstance(layer, _FOLDABLE):
        raise TypeError(
            f"`fold_into` folds into an `eqx.nn.Linear`, `eqx.nn.Conv` or "
            f"`eqx.nn.ConvTranspose`, got a {_describe(layer)}."
        )
    if not _is_norm(bn):
        raise TypeError(
            "`fold_into` folds an `eqx_norm.BatchNorm` or `eqx.nn.BatchNorm`, got a "
            f"{_describe(bn)} after the {_describe(layer)}."
        )
    out = layer.weight.shape[0]
    if isinstance(layer, eqx.nn.Linear) and layer.out_features == "scalar":
        out = None
    if bn.input_size != out:
        raise ValueError(
            f"`fold_into`: the {_describe(bn)} normalises {bn.input_size} channels, "
            f"but the {_describe(layer)} before it has {out} output channels."
        )
    if isinstance(bn, BatchNorm):
        ndim = 1 if isinstance(layer, eqx.nn.Linear) else layer.num_spatial_dims + 1
        if bn.channel_axis % ndim != 0:
            raise ValueError(
                f"`fold_into`: the BatchNorm's `channel_axis={bn.channel_axis}` is not "
                f"the {_describe(layer)}'s output channels (axis 0 of its "
                f"{ndim}-D output)."
            )
    scale, shift = _affine(bn, state)
    dtype = layer.weight.dtype
    compute = jnp.promote_types(dtype, scale.dtype)
    broadcast = (out,) + (1,) * (layer.weight.ndim - 1)
    weight = layer.weight.astype(compute) * scale.reshape(broadcast)
    bias_shape = (out,) + (1,) * (layer.weight.ndim - 2)
    old_bias = (
        jnp.zeros(bias_shape, compute)
        if layer.bias is None
        else layer.bias.astype(compute)
    )
    bias = old_bias * scale.reshape(bias_shape) + shift.reshape(bias_shape)
    if layer.bias is None:
        layer = _with_bias(layer)
    return eqx.tree_at(
        lambda m: (m.weight, m.bias), layer, (weight.astype(dtype), bias.astype(dtype))
    )


def _with_bias(layer):
    """The same layer with a bias (of zeros), built through its constructor."""
    key = jax.random.key(0)  # every value is replaced
    dtype = layer.weight.dtype
    if isinstance(layer, eqx.nn.Linear):
        return eqx.nn.Linear(
            layer.in_features, layer.out_features, use_bias=True, dtype=dtype, key=key
        )
    kwargs: dict[str, Any] = dict(
        in_channels=layer.in_channels,
        out_channels=layer.out_channels,
        kernel_size=layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
        use_bias=True,
        padding_mode=layer.padding_mode,
        dtype=dtype,
        key=key,
    )
    if isinstance(layer, eqx.nn.ConvTranspose):
        kwargs["output_padding"] = layer.output_padding
    if type(layer) in _FIXED_DIMENSIONS:  # Conv2d and the like
        return type(layer)(**kwargs)
    base = (
        eqx.nn.ConvTranspose if isinstance(layer, eqx.nn.ConvTranspose) else eqx.nn.Conv
    )
    return base(num_spatial_dims=layer.num_spatial_dims, **kwargs)


_FIXED_DIMENSIONS = (
    eqx.nn.Conv1d,
    eqx.nn.Conv2d,
    eqx.nn.Conv3d,
    eqx.nn.ConvTranspose1d,
    eqx.nn.ConvTranspose2d,
    eqx.nn.ConvTranspose3d,
)


def fold(
    model: PyTree, state: eqx.nn.State, *, strict: bool = False
) -> tuple[PyTree, eqx.nn.State]:
    """Fold every BatchNorm that directly follows a linear layer into it, for serving.

    Inside every `eqx.nn.Sequential` of the model (nested ones included), each
    [`eqx_norm.BatchNorm`][] or `eqx.nn.BatchNorm` right after an `eqx.nn.Linear`,
    `eqx.nn.Conv` or `eqx.nn.ConvTranspose` is folded into that layer (see
    [`eqx_norm.fold_into`][]) and replaced by `eqx.nn.Identity`. Anything in between
    (an `eqx.nn.Lambda` activation, say) prevents folding, as it must. The folded
    model computes what the original computes in inference mode.

    **Arguments:**

    - `model`: any pytree.
    - `state`: its `eqx.nn.State`.
    - `strict`: if `True`, a BatchNorm that cannot be folded is an error instead of
        a warning.

    **Returns:**

    A 2-tuple `(model, state)`: a new model (a `Linear` or `Conv` subclass of
    Equinox's own is rebuilt as the same class; a user's subclass that gains a bias
    is rebuilt as `eqx.nn.Conv` or `eqx.nn.ConvTranspose`). The state holds only
    what the remaining stateful layers need; where every BatchNorm was folded the
    model holds no `eqx_norm` object, serialises with `eqx.tree_serialise_leaves`,
    runs without `eqx_norm` installed, and (as an `eqx.nn.Sequential`) can be called
    without a state.

    **Raises:**

    A `ValueError` with `strict=True` if a BatchNorm is left in place, naming it.
    """

    def fold_sequential(seq: eqx.nn.Sequential) -> eqx.nn.Sequential:
        layers = [
            fold_sequential(x) if isinstance(x, eqx.nn.Sequential) else x
            for x in seq.layers
        ]
        for i in range(1, len(layers)):
            if _is_norm(layers[i]) and isinstance(layers[i - 1], _FOLDABLE):
                layers[i - 1] = fold_into(layers[i - 1], layers[i], state)
                layers[i] = eqx.nn.Identity()
        return eqx.nn.Sequential(layers)

    def visit(x):
        return fold_sequential(x) if isinstance(x, eqx.nn.Sequential) else x

    is_sequential = lambda x: isinstance(x, eqx.nn.Sequential)  # noqa: E731
    folded = jtu.tree_map(visit, model, is_leaf=is_sequential)
    left = [
        jtu.keystr(path)
        for path, leaf in jtu.tree_leaves_with_path(folded, is_leaf=_is_norm)
        if _is_norm(leaf)
    ]
    if left:
        message = (
            f"`fold` left {len(left)} BatchNorm layer(s) in place at {left}: each "
            "must directly follow an `eqx.nn.Linear`, `eqx.nn.Conv` or "
            "`eqx.nn.ConvTranspose` in an `eqx.nn.Sequential` (an activation in "
            "between prevents folding). Use `eqx_norm.fold_into` for custom modules."
        )
        if strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
    # A new state for the folded model: each remaining state index starts from its
    # current value.
    is_index = lambda x: isinstance(x, eqx.nn.StateIndex)  # noqa: E731
    folded = jtu.tree_map(
        lambda x: eqx.nn.StateIndex(state.get(x)) if is_index(x) else x,
        folded,
        is_leaf=is_index,
    )
    return eqx.nn.make_with_state(lambda: folded)()
