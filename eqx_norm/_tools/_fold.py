"""Folding inference-mode BatchNorm layers into the linear layer before them, for
serving."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PyTree

from .._checks import concrete
from .._nn._batch_norm import BatchNorm
from .._nn._channel_affine import ChannelAffine
from ._from_equinox import equinox_inference_statistics

_FOLDABLE = (eqx.nn.Linear, eqx.nn.Conv, eqx.nn.ConvTranspose)


def _is_batch_norm(x: Any) -> bool:
    return isinstance(x, (BatchNorm, eqx.nn.BatchNorm))


def _name(bn) -> str:
    """The BatchNorm as its constructor would be written."""
    if isinstance(bn, BatchNorm):
        return (
            f"`eqx_norm.BatchNorm(input_size={bn.input_size}, "
            f"channel_axis={bn.channel_axis})`"
        )
    return f"`eqx.nn.BatchNorm(input_size={bn.input_size}, mode={bn.mode!r})`"


def _unfoldable(layer, bn) -> str | None:
    """Why `bn` cannot be folded into `layer` (it does not normalise the layer's
    output channels), or `None` if it can."""
    out = layer.weight.shape[0]
    if isinstance(layer, eqx.nn.Linear) and layer.out_features == "scalar":
        out = None
    if bn.input_size != out:
        return (
            f"the {type(bn).__name__} normalises {bn.input_size} channels, but the "
            f"{type(layer).__name__} before it has {out} output channels"
        )
    if not isinstance(bn, BatchNorm):
        return None  # `eqx.nn.BatchNorm` normalises axis 0
    ndim = 1 if isinstance(layer, eqx.nn.Linear) else layer.num_spatial_dims + 1
    if not -ndim <= bn.channel_axis < ndim:
        return (
            f"the BatchNorm {_name(bn)} has `channel_axis={bn.channel_axis}`, out of "
            f"range for the {ndim}-D output of the {type(layer).__name__} before it "
            "(the BatchNorm itself refuses that output); its output channels are "
            f"`channel_axis=0` (or {-ndim})"
        )
    if bn.channel_axis % ndim != 0:
        return (
            f"the BatchNorm's `channel_axis={bn.channel_axis}` is not the "
            f"{type(layer).__name__}'s output channels (axis 0 of its {ndim}-D output)"
        )
    return None


def _statistics(bn, state: eqx.nn.State, where: str) -> tuple[Array, Array]:
    """The statistics the BatchNorm's own inference uses, exactly."""
    try:
        if isinstance(bn, BatchNorm):
            return bn.statistics(state)
        return equinox_inference_statistics(bn, state)
    except KeyError:
        raise ValueError(
            f"{where}: the state does not hold the statistics of the BatchNorm "
            f"{_name(bn)}: pass the state made with the model that holds it (by "
            "`eqx.nn.make_with_state`, or returned by the last training step)."
        ) from None


def _affine(bn, state: eqx.nn.State, where: str) -> tuple[Array, Array]:
    """`(scale, shift)` per channel: the BatchNorm's inference output is
    `x * scale + shift`. A `ValueError` naming the channel if either is not finite
    (where the statistics are concrete)."""
    mean, var = _statistics(bn, state, where)
    scale = jax.lax.rsqrt(var + bn.eps)
    if bn.weight is not None and bn.bias is not None:
        scale = scale * bn.weight.astype(scale.dtype)
        shift = bn.bias.astype(scale.dtype) - mean * scale
    else:
        shift = -mean * scale
    values = concrete(jnp.stack([scale, shift]))
    if values is not None and not np.all(np.isfinite(values)):
        channel = int(np.flatnonzero(~np.all(np.isfinite(values), axis=0))[0])
        m, v = float(mean[channel]), float(var[channel])
        fix = (
            "With `eps=0` a zero variance divides by zero (the unfolded layer "
            "outputs inf or NaN there too): give the BatchNorm a positive `eps`, "
            "e.g. `eps=1e-5`, or the channel a positive variance with "
            "`bn.set_statistics`."
            if v == 0 and bn.eps == 0
            else "Repair the statistics or the weight and bias first (see "
            "`eqx_norm.diagnose`)."
        )
        affine = (
            ""
            if bn.weight is None or bn.bias is None
            else f", weight {float(bn.weight[channel])}, bias {float(bn.bias[channel])}"
        )
        raise ValueError(
            f"{where}: channel {channel} of the BatchNorm {_name(bn)} folds to a "
            f"non-finite scale or shift: mean {m}, variance {v}, `eps={bn.eps}`"
            f"{affine}. {fix}"
        )
    return scale, shift


def fold_into(layer, bn, state: eqx.nn.State):
    """Fold one BatchNorm's inference-mode normalisation into the layer before it.

    `bn(layer(x))` in inference mode is `folded(x)`, computed in the layer's dtype:
    the weight of each output channel is scaled by `weight / sqrt(var + eps)` of the
    BatchNorm, and the bias becomes the BatchNorm's affine map of the old bias (a
    layer without a bias gains one). The statistics are exactly those the BatchNorm's
    own inference uses: [`eqx_norm.BatchNorm.statistics`][], or for an
    `eqx.nn.BatchNorm` what Equinox reads (in ema mode its buffers as they are, so
    that a layer that never trained folds its zero variance as it normalises with
    it, by `1 / sqrt(eps)`).

    ```python
    linear = eqx.nn.Linear(784, 512, key=jax.random.key(0))
    bn, state = eqx.nn.make_with_state(eqx_norm.BatchNorm)(512, "batch")
    folded = eqx_norm.fold_into(linear, bn, state)  # bn(linear(x)) in inference
    ```

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

    A `TypeError` for a layer or BatchNorm of another type. A `ValueError` if the
    BatchNorm's channels are not the layer's output channels (another count, or a
    `channel_axis` that is not axis 0 of the layer's output); if a channel's scale
    `weight / sqrt(var + eps)` or shift is not finite (a zero variance with
    `eps=0`, or non-finite statistics), naming the channel, its variance and
    `eps`; or if the folded weights overflow the layer's dtype. These values are
    checked where they are concrete: under `jax.jit` they are traced and not
    checked, and a zero `var + eps` gives infinite weights, as it gives infinite
    outputs unfolded.
    """
    if not isinstance(layer, _FOLDABLE):
        after = f" before the BatchNorm {_name(bn)}" if _is_batch_norm(bn) else ""
        raise TypeError(
            f"`fold_into` folds into an `eqx.nn.Linear`, `eqx.nn.Conv` or "
            f"`eqx.nn.ConvTranspose`, got a {type(layer).__name__}{after}."
        )
    if not _is_batch_norm(bn):
        raise TypeError(
            "`fold_into` folds an `eqx_norm.BatchNorm` or `eqx.nn.BatchNorm`, got a "
            f"{type(bn).__name__} after the {type(layer).__name__}."
        )
    reason = _unfoldable(layer, bn)
    if reason is not None:
        raise ValueError(f"`fold_into`: {reason}.")
    return _fold_pair(layer, bn, state, "`fold_into`")


def _fold_pair(layer, bn, state: eqx.nn.State, where: str):
    """`fold_into` once the pair is known to fold; `where` starts each error."""
    scale, shift = _affine(bn, state, where)
    out = layer.weight.shape[0]
    dtype = layer.weight.dtype
    # The wider of the two, chosen here: `jnp.promote_types` refuses float16 with
    # float32 under strict dtype promotion.
    compute = max((jnp.dtype(scale.dtype), jnp.dtype(dtype)), key=_bits)
    broadcast = (out,) + (1,) * (layer.weight.ndim - 1)
    weight = layer.weight.astype(compute) * scale.reshape(broadcast)
    bias_shape = (out,) + (1,) * (layer.weight.ndim - 2)
    old_bias = (
        jnp.zeros(bias_shape, compute)
        if layer.bias is None
        else layer.bias.astype(compute)
    )
    bias = old_bias * scale.reshape(bias_shape) + shift.reshape(bias_shape)
    weight, bias = weight.astype(dtype), bias.astype(dtype)
    _check_overflow(layer, bn, (weight, bias), where)
    if layer.bias is None:
        layer = _with_bias(layer)
    return eqx.tree_at(lambda m: (m.weight, m.bias), layer, (weight, bias))


def _bits(dtype: np.dtype) -> int:
    return jnp.finfo(dtype).bits


def _check_overflow(layer, bn, folded: tuple[Array, Array], where: str) -> None:
    """A `ValueError` if a folded weight or bias is infinite where the layer's own
    were finite: the scale overflowed the layer's dtype (float16, say)."""
    for name, new, old in zip(("weight", "bias"), folded, (layer.weight, layer.bias)):
        new, old = concrete(new), None if old is None else concrete(old)
        if new is None:
            return
        finite_before = (
            np.ones(new.shape, bool) if old is None else np.isfinite(old)
        ).reshape(new.shape[0], -1)
        bad = finite_before & ~np.isfinite(new.reshape(new.shape[0], -1))
        if bad.any():
            channel = int(np.flatnonzero(bad.any(axis=1))[0])
            raise ValueError(
                f"{where}: folding the BatchNorm {_name(bn)} into the "
                f"{type(layer).__name__} overflows its {new.dtype} {name} in output "
                f"channel {channel}. Fold a copy of the layer in a wider dtype, e.g. "
                "`jax.tree.map(lambda a: a.astype(jnp.float32), layer)`, or keep "
                "the BatchNorm."
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


def _served(bn, state: eqx.nn.State, where: str) -> ChannelAffine:
    """The BatchNorm's inference-mode normalisation as a stateless map."""
    scale, shift = _affine(bn, state, where)
    axis = bn.channel_axis if isinstance(bn, BatchNorm) else 0
    return ChannelAffine(scale, shift, axis)


def fold(
    model: PyTree, state: eqx.nn.State, *, strict: bool = False
) -> tuple[PyTree, eqx.nn.State]:
    """Fold every BatchNorm of a model for serving: into the linear layer before it
    where the model's structure shows one, else into a stateless per-channel map.

    Inside every `eqx.nn.Sequential` of the model (nested ones included), each
    [`eqx_norm.BatchNorm`][] or `eqx.nn.BatchNorm` right after an `eqx.nn.Linear`,
    `eqx.nn.Conv` or `eqx.nn.ConvTranspose` that normalises that layer's output
    channels is folded into that layer (see [`eqx_norm.fold_into`][]) and replaced
    by `eqx.nn.Identity`. Every other BatchNorm (after an activation, over another
    axis, or in a module of your own, such as a residual block that calls
    `h, state = self.bn1(h, state)`) is replaced by an
    [`eqx_norm.ChannelAffine`][]: its inference-mode normalisation as
    `x * scale + shift`, called as the BatchNorm was. The folded model computes what
    the original computes in inference mode, and holds no BatchNorm.

    ```python
    served, served_state = eqx_norm.fold(model, state)
    ```

    **Arguments:**

    - `model`: any pytree.
    - `state`: its `eqx.nn.State`.
    - `strict`: if `True`, a BatchNorm that cannot be folded into a layer before it
        is an error instead of becoming an `eqx_norm.ChannelAffine`.

    **Returns:**

    A 2-tuple `(model, state)`: a new model (a `Linear` or `Conv` subclass of
    Equinox's own is rebuilt as the same class; a user's subclass that gains a bias
    is rebuilt as `eqx.nn.Conv` or `eqx.nn.ConvTranspose`). The state holds only
    what the model's other stateful layers need, if any. Where every BatchNorm was
    folded into a layer the model holds no `eqx_norm` object, serialises with
    `eqx.tree_serialise_leaves`, runs without `eqx_norm` installed, and (as an
    `eqx.nn.Sequential`) can be called without a state. A module of your own is
    called as before, `y, state = model(x, state)`, with the returned state.

    **Raises:**

    A `ValueError` with `strict=True` if a BatchNorm cannot be folded into a layer,
    naming it and why; and, as [`eqx_norm.fold_into`][] raises it, naming the
    layer's path, if a channel's scale or shift is not finite (a zero variance with
    `eps=0`) or overflows the layer's dtype. Under `jax.jit` those values are not
    checked.
    """
    unfolded: list[str] = []  # the BatchNorms not folded into a layer, with reasons

    def fold_sequential(seq: eqx.nn.Sequential, where: str) -> eqx.nn.Sequential:
        layers = [
            fold_sequential(x, f"{where}.layers[{i}]")
            if isinstance(x, eqx.nn.Sequential)
            else x
            for i, x in enumerate(seq.layers)
        ]
        for i in range(len(layers)):
            if not _is_batch_norm(layers[i]):
                continue
            here = f"{where}.layers[{i}]"
            before = layers[i - 1] if i else None
            reason = (
                "it does not directly follow an `eqx.nn.Linear`, `eqx.nn.Conv` or "
                "`eqx.nn.ConvTranspose`"
                if not isinstance(before, _FOLDABLE)
                else _unfoldable(before, layers[i])
            )
            message = f"`fold`: the BatchNorm at {here!r}"
            if reason is not None:
                unfolded.append(f"{here} ({reason})")
                layers[i] = _served(layers[i], state, message)
                continue
            layers[i - 1] = _fold_pair(before, layers[i], state, message)
            layers[i] = eqx.nn.Identity()
        return eqx.nn.Sequential(layers)

    def visit(path, x):
        if isinstance(x, eqx.nn.Sequential):
            return fold_sequential(x, jtu.keystr(path))
        if _is_batch_norm(x):  # in a module of the user's own
            here = jtu.keystr(path) or _ROOT
            unfolded.append(f"{here} (in a module other than `eqx.nn.Sequential`)")
            return _served(x, state, f"`fold`: the BatchNorm at {here!r}")
        return x

    is_node = lambda x: isinstance(x, eqx.nn.Sequential) or _is_batch_norm(x)  # noqa: E731
    if strict:
        jtu.tree_map_with_path(visit, model, is_leaf=is_node)  # to list them
        if unfolded:
            raise ValueError(
                f"`fold(strict=True)`: {len(unfolded)} BatchNorm layer(s) cannot be "
                f"folded into the layer before them: {unfolded}. Each must directly "
                "follow an `eqx.nn.Linear`, `eqx.nn.Conv` or `eqx.nn.ConvTranspose` "
                "in an `eqx.nn.Sequential` and normalise its output channels. "
                "Without `strict`, each becomes an `eqx_norm.ChannelAffine` (its "
                "inference-mode normalisation, with no state)."
            )
    folded = jtu.tree_map_with_path(visit, model, is_leaf=is_node)
    # A new state for the folded model: each remaining state index (of the model's
    # other stateful layers) starts from its current value.
    is_index = lambda x: isinstance(x, eqx.nn.StateIndex)  # noqa: E731
    folded = jtu.tree_map(
        lambda x: eqx.nn.StateIndex(state.get(x)) if is_index(x) else x,
        folded,
        is_leaf=is_index,
    )
    return eqx.nn.make_with_state(lambda: folded)()


_ROOT = "(the model itself)"
