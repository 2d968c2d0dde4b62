import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax

from .._checks import positive_int
from .._state import copy_state
from ._contract import StepGradient, declares_point, pass_point, perturb

_PERTURBATIONS = ("whole-batch", "per-micro-batch")


def _describe(x: Any) -> str:
    """A short picture of a pytree for an error message: arrays as dtype[shape]."""
    if isinstance(x, eqx.nn.State):
        return "State"
    if isinstance(x, tuple):  # NamedTuples (optimizer states) by their names
        name = type(x).__name__ if hasattr(x, "_fields") else ""
        return name + "(" + ", ".join(_describe(a) for a in x) + ")"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in x.items()) + "}"
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{x.dtype}{list(x.shape)}"
    return type(x).__name__


def _check_output(out: Any, has_aux: bool) -> None:
    """A `TypeError` naming `loss_fn` if its output is not `(loss, state)` (or
    `(loss, (state, aux))` with `has_aux=True`), with a scalar floating loss."""
    expected = "(loss, (state, aux))" if has_aux else "(loss, state)"
    hint = ""
    if isinstance(out, tuple) and len(out) == 2:
        loss, rest = out
        loss_ok = (
            hasattr(loss, "dtype")
            and jnp.ndim(loss) == 0
            and jnp.issubdtype(loss.dtype, jnp.floating)
        )
        pair = isinstance(rest, tuple) and len(rest) == 2
        if has_aux:
            rest_ok = pair and isinstance(rest[0], eqx.nn.State)
        else:
            rest_ok = isinstance(rest, eqx.nn.State)
        if loss_ok and rest_ok:
            return
        if not has_aux and pair and isinstance(rest[0], eqx.nn.State):
            hint = " It returned an aux too: pass `has_aux=True`."
        elif has_aux and isinstance(rest, eqx.nn.State):
            hint = " It returned no aux: leave `has_aux=False`."
        elif pair and isinstance(rest[1], eqx.nn.State):
            hint = " The state comes first: `(loss, (state, aux))`."
        elif not loss_ok:
            hint = " The loss must be a scalar of a floating dtype (e.g. a `.mean()`)."
    raise TypeError(
        f"`loss_fn` must return {expected}, with a scalar loss and the new "
        f"`eqx.nn.State`; it returned {_describe(out)}.{hint}"
    )


def sam_step(
    loss_fn: Callable[..., tuple[Any, Any]],
    optimizer: optax.GradientTransformation | optax.MultiSteps,
    *,
    has_aux: bool = False,
    axis_name: Hashable | Sequence[Hashable] | None = None,
    per_device_perturbation: bool = False,
    micro_batches: int | np.integer = 1,
    perturbation: Literal["whole-batch", "per-micro-batch"] = "whole-batch",
) -> Callable[..., tuple[Any, ...]]:
    """The training step of an Equinox model with state, for SAM or any optimizer.

    The first pass, at the current parameters, gives the loss, the gradient and the
    new state. The optimizer's update is given `grad_fn` as an extra argument (an
    [`eqx_norm.StepGradient`][]): a SAM-family optimizer such as
    [`eqx_norm.sam`][] or [`eqx_norm.looksam`][] (anywhere inside `optax.chain`,
    `optax.inject_hyperparams`, `optax.apply_if_finite` or `optax.MultiSteps`)
    hands it its perturbation rule through [`eqx_norm.perturbed_gradient`][], and
    the step returns the gradient at the perturbed point: a second pass that sees
    the *same* input state and whose state output is dropped. So BatchNorm running
    statistics are updated once per step, by the unperturbed pass, exactly as a
    plain step would. Any other Optax optimizer ignores `grad_fn`, so the step is
    the ordinary one-pass step, and one training loop serves both. The options
    below say where the gradients come from; the optimizer says how it perturbs;
    neither inspects the other. An optimizer that knows the point of its one
    gradient before the step (one with an [`eqx_norm.NextPerturbation`][] in its
    state, such as Momentum-SAM) gets its single pass taken there, the parameters it
    updates staying unperturbed.

    ```python
    def loss_fn(model, state, x, y):
        batch_model = jax.vmap(
            model, in_axes=(0, None), out_axes=(0, None), axis_name="batch"
        )
        logits, state = batch_model(x, state)
        return cross_entropy(logits, y), state

    step = eqx.filter_jit(eqx_norm.sam_step(loss_fn, eqx_norm.sam(optax.adam(3e-3))))
    model, state, opt_state, loss = step(model, state, opt_state, x, y)
    ```

    Several devices. Under `jax.jit` with the batch sharded over a mesh (see
    [`eqx_norm.shard_batch`][]), gradients are those of the global batch already:
    leave `axis_name` as `None`. Inside `jax.shard_map`, where each device sees its
    shard of the batch, pass the mesh axis as `axis_name`: the loss and gradients are
    averaged across it, and by default the perturbation comes from the averaged
    gradient, so SAM on 8 devices is SAM on the full batch. With
    `per_device_perturbation=True` each device perturbs with its own gradient and
    only the gradients at the perturbed points are averaged (the paper's
    m-sharpness, with m the per-device batch); the optimizer itself is still given
    the averaged gradient.

    Micro-batches. With `micro_batches=m` the batch (every array of `*batch`, along
    its leading axis) is split into `m` equal consecutive micro-batches, processed
    one after another (`lax.scan`), so that the activation memory is that of one
    micro-batch. The first pass threads the state through them (BatchNorm statistics
    are updated once per micro-batch, as in any gradient accumulation) and averages
    their gradients; the perturbation comes from that average, so it is SAM over the
    whole batch; the second pass evaluates each micro-batch at the perturbed point
    from the state that micro-batch saw in the first pass, drops its state output,
    and averages the perturbed gradients. The loss returned is the mean of the
    micro-batch losses, and an aux is that of each micro-batch, stacked on a leading
    axis of size `m`. With a plain optimizer this is plain gradient accumulation.

    With `perturbation="per-micro-batch"` each micro-batch is perturbed by its own
    gradient instead, and only the gradients at the perturbed points are averaged:
    the SAM paper's m-sharpness, with m the micro-batch size, on one device. The
    second pass is still one micro-batch at a time; it keeps the `m` first-pass
    gradients (`m` copies of the parameters' size) to do so. With `axis_name`, each
    device's micro-batches are perturbed by their own gradients. With LookSAM the
    steps that perturb do so per micro-batch. The per-device and per-micro-batch
    options change only where a SAM-family optimizer's perturbation comes from: with
    an optimizer that does not perturb, the step is the plain step.

    **Arguments:**

    - `loss_fn`: `loss_fn(model, state, *batch)` returning `(loss, new_state)`, or
        `(loss, (new_state, aux))` with `has_aux=True`, with a scalar loss.
    - `optimizer`: an Optax optimizer (an `optax.MultiSteps` too), initialised on
        `eqx.filter(model, eqx.is_inexact_array)`.
    - `has_aux`: whether `loss_fn` returns an aux, as in `jax.grad`.
    - `axis_name`: inside `shard_map`, the data-parallel mesh axis (or axes).
    - `per_device_perturbation`: with `axis_name` and SAM, perturb with each
        device's own gradient.
    - `micro_batches`: the number of micro-batches the batch is split into (1: the
        whole batch at once).
    - `perturbation`: `"whole-batch"` (one perturbation from the mean gradient) or
        `"per-micro-batch"` (one per micro-batch, from its own gradient).

    **Returns:**

    `step(model, state, opt_state, *batch)` returning
    `(model, state, opt_state, loss)`, or `(model, state, opt_state, loss, aux)`
    with `has_aux=True`. It can be wrapped in `eqx.filter_jit`, `eqx.filter_vmap`
    (an ensemble of models) or `jax.lax.scan`.

    **Raises:**

    At once, a `ValueError` for a `micro_batches` below 1 (a `TypeError` if it is
    not an int of any integer type), an unknown `perturbation`, or
    `per_device_perturbation` without `axis_name`. When the step is traced, a
    `TypeError` naming `loss_fn` if it returns another structure than `has_aux`
    says, and a `ValueError` naming `opt_state` if it is not a state of `optimizer`
    for this model, if `micro_batches` does not divide the batch or the batch's
    arrays differ in length, or if a per-device or per-micro-batch perturbation is
    asked of an optimizer that calls `grad_fn` at a point of its own instead of
    through `eqx_norm.perturbed_gradient`.
    """
    micro_batches = positive_int("micro_batches", micro_batches, "micro_batches=4")
    if perturbation not in _PERTURBATIONS:
        raise ValueError(
            f"`perturbation` must be one of {_PERTURBATIONS}, got {perturbation!r}; "
            'e.g. `perturbation="per-micro-batch"` for one perturbation per '
            "micro-batch."
        )
    if per_device_perturbation and axis_name is None:
        raise ValueError(
            "`per_device_perturbation=True` needs the data axis: pass `axis_name=` "
            "(the `shard_map` mesh axis the batch is split over)."
        )
    if perturbation == "per-micro-batch":
        source = "micro-batch"
    elif per_device_perturbation:
        source = "device"
    else:
        source = "mean"

    def mean(tree):
        return tree if axis_name is None else jax.lax.pmean(tree, axis_name)

    if isinstance(optimizer, optax.MultiSteps):
        # Its `update` passes extra arguments on, but it is not marked as doing so.
        optimizer = optax.GradientTransformationExtraArgs(
            optimizer.init,
            optimizer.update,  # pyright: ignore[reportArgumentType]
        )
    optimizer = optax.with_extra_args_support(optimizer)

    def step(model, state, opt_state, *batch):
        _check_not_traced_whole(model)
        params, static = eqx.partition(model, eqx.is_inexact_array)
        _check_opt_state(optimizer, opt_state, params)
        _check_not_empty(batch)

        def loss_and_rest(params, state, batch):
            out = loss_fn(eqx.combine(params, static), state, *batch)
            _check_output(out, has_aux)
            return out

        at = pass_point(opt_state, params)  # `params`, but for one-pass optimizers
        if source != "mean" and declares_point(opt_state):
            flag, part = (
                ('perturbation="per-micro-batch"', "micro-batch")
                if source == "micro-batch"
                else ("per_device_perturbation=True", "device")
            )
            raise ValueError(
                f"`sam_step(...)` with `{flag}` perturbs each {part} by its own "
                "gradient, "
                "but this optimizer declares its one perturbation before the step "
                "(an `eqx_norm.NextPerturbation` in its state, as `eqx_norm.msam` "
                "does), so no part has a perturbation of its own. Leave the option "
                "out: the step's one pass is taken at the declared point."
            )
        if micro_batches == 1:
            first = _whole_batch(loss_and_rest, at, state, batch)
        else:
            first = _in_micro_batches(
                loss_and_rest, at, state, batch, micro_batches, has_aux
            )
        updates, opt_state = optimizer.update(
            mean(first.grads),
            opt_state,
            params,
            grad_fn=_Gradients(
                first, loss_and_rest, source, mean, _accumulating(opt_state), params
            ),
        )
        model = eqx.apply_updates(model, updates)
        if has_aux:
            new_state, aux = first.rest
            return model, new_state, opt_state, mean(first.loss), aux
        return model, first.rest, opt_state, mean(first.loss)

    return step


class _FirstPass(NamedTuple):
    """The unperturbed pass: its mean loss, `rest` (the new state, with the aux),
    this device's mean gradient, `gradient_at(p)` (the mean gradient at other
    parameters from the same input states), and, with micro-batches, the parts a
    per-micro-batch perturbation needs: the micro-batches, the states they saw and
    their gradients, stacked on a leading axis."""

    loss: Any
    rest: Any
    grads: Any
    gradient_at: Callable[[Any], Any]
    parts: tuple[Any, Any, Any, Callable[[Any], tuple]] | None


class _Gradients(StepGradient):
    """The step's `grad_fn`: the gradient at other parameters of this step's batch,
    and the gradient at a perturbation rule's points, from the gradient that
    `source` names: `"mean"` (the one the optimizer was given), `"device"` (this
    device's own) or `"micro-batch"` (each micro-batch's own)."""

    def __init__(
        self,
        first: _FirstPass,
        loss_and_rest,
        source: str,
        mean,
        accumulating,
        params,
    ):
        self.first = first
        self.loss_and_rest = loss_and_rest
        self.source = source
        self.mean = mean
        self.accumulating = accumulating
        self.params = params  # the step's parameters, whole

    def _whole(self, params):
        """`params` with what `optax.masked` leaves out (`optax.MaskedNode`) filled
        from the step's own parameters; a `ValueError` naming `grad_fn` for a tree
        that is not the parameters."""
        if not _same_shape(params, self.params):
            raise ValueError(
                "This optimizer called the step's `grad_fn` with a tree that does "
                "not have the structure of the parameters: the parameters are "
                f"{jax.tree.structure(self.params)}, it got "
                f"{jax.tree.structure(params)}. Call `grad_fn` with parameters "
                "(`params + e`, e.g. from `eqx_norm.perturbed_gradient`), not the "
                "model or another tree."
            )
        return _filled(params, self.params, params)

    def _refuse_accumulation(self, grads):
        """`grads`, stopped at run time where an `optax.MultiSteps` accumulates
        (`every_k_schedule` above 1): the second gradient would be of the last
        mini-batch only."""
        if self.accumulating is None:
            return grads
        return eqx.error_if(grads, self.accumulating, _MULTI_STEPS)

    def __call__(self, params):
        if self.source != "mean":
            flag = (
                'perturbation="per-micro-batch"'
                if self.source == "micro-batch"
                else "per_device_perturbation=True"
            )
            raise ValueError(
                f"`sam_step(..., {flag})` applies each part's own gradient to the "
                "optimizer's perturbation rule, but this optimizer called `grad_fn` "
                "with a point it chose itself. Get the second gradient with "
                "`eqx_norm.perturbed_gradient(grad_fn, rule, grads, params)`, as "
                "`eqx_norm.sam` does."
            )
        out = self.first.gradient_at(self._whole(params))
        return self._refuse_accumulation(self.mean(_like(out, params)))

    def perturbed(self, rule, grads, params):
        first = self.first
        masked = params
        if any(map(_is_masked, jax.tree.leaves(params, is_leaf=_is_masked))):
            # Inside `optax.masked`: the rule sees what the mask leaves in, and the
            # point is the step's parameters with only those moved.
            inner = rule
            zeros = jax.tree.map(jnp.zeros_like, self.params)

            def whole_rule(grads, params):
                e = inner(_like(grads, masked), _like(params, masked))
                return _filled(e, zeros, masked)

            rule = whole_rule
            grads, params = _filled(grads, zeros, masked), self.params
        if self.source == "micro-batch" and first.parts is not None:
            out = _per_micro_batch(self.loss_and_rest, rule, params, first.parts)
        else:
            own = grads if self.source == "mean" else first.grads
            out = first.gradient_at(perturb(params, rule(own, params)))
        return self._refuse_accumulation(self.mean(_like(out, masked)))


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _same_shape(tree: Any, like: Any) -> bool:
    """Whether `tree` has the structure of `like`, with `optax.MaskedNode` where a
    leaf may be left out."""
    leaves = jax.tree.map(lambda _: 0, tree, is_leaf=_is_masked)
    return jax.tree.structure(leaves) == jax.tree.structure(like)


def _like(tree: Any, masked: Any) -> Any:
    """`tree` (of the parameters' structure) with `optax.MaskedNode` where `masked`
    has one."""
    return jax.tree.map(
        lambda m, x: m if _is_masked(m) else x, masked, tree, is_leaf=_is_masked
    )


def _filled(tree: Any, whole: Any, masked: Any) -> Any:
    """`tree` (of `masked`'s structure) with the leaves of `whole` where `masked`
    has an `optax.MaskedNode`: a tree of the parameters' structure."""
    return jax.tree.map(
        lambda m, w, x: w if _is_masked(m) else x,
        masked,
        whole,
        tree,
        is_leaf=_is_masked,
    )


_MULTI_STEPS = (
    "A SAM-family optimizer inside `optax.MultiSteps` with `every_k_schedule` above "
    "1 would perturb with the gradient accumulated over the mini-batches but take "
    "the gradient at the perturbed point on the last mini-batch only, so the "
    "earlier mini-batches would never reach the update. For SAM over accumulated "
    "batches, give `sam_step` the whole batch and the optimizer without "
    "`MultiSteps`: `eqx_norm.sam_step(loss_fn, eqx_norm.sam(...), "
    "micro_batches=k)` splits it into k micro-batches and evaluates both gradients "
    "on all of them."
)


def _accumulating(opt_state) -> Any:
    """Whether an `optax.MultiSteps` in `opt_state` is between two updates (its
    mini-step above 0, which happens only with `every_k_schedule` above 1), as a
    boolean array; `None` where there is no `MultiSteps`. The number of
    mini-batches may be a schedule, so it is known only when the step runs."""
    is_multi = lambda x: isinstance(x, optax.MultiStepsState)  # noqa: E731
    found = [
        x.mini_step > 0
        for x in jax.tree.leaves(opt_state, is_leaf=is_multi)
        if is_multi(x)
    ]
    return None if not found else functools.reduce(jnp.logical_or, found)


def _check_not_traced_whole(model) -> None:
    """A `TypeError` pointing to `eqx.filter_jit` if the model's `inference` flags
    are traced: the step was wrapped in `jax.jit`, which traces every leaf of its
    arguments, Python bools included, where `eqx.filter_jit` keeps them static."""
    for path, leaf in jtu.tree_leaves_with_path(model):
        name = getattr(path[-1], "name", None) if path else None
        traced = isinstance(leaf, jax.core.Tracer)  # pyright: ignore[reportAttributeAccessIssue]
        if name == "inference" and traced:
            raise TypeError(
                f"`sam_step`'s step got a model whose `inference` flag (at "
                f"`model{jtu.keystr(path)}`) is a traced array, not a bool: the step "
                "was wrapped in `jax.jit`, which traces every leaf of the model. "
                "Wrap it in `eqx.filter_jit` instead, which keeps non-array leaves "
                "static: `step = eqx.filter_jit(eqx_norm.sam_step(loss_fn, "
                "optimizer))`."
            )


def _check_opt_state(optimizer, opt_state, params) -> None:
    """A `ValueError` naming `opt_state` if it is not the state `optimizer.init`
    makes for these parameters (another optimizer's, or other parameters'),
    showing the first place where the two differ."""
    expected = jax.eval_shape(optimizer.init, params)
    difference = _first_difference(expected, opt_state)
    if difference is not None:
        raise ValueError(
            "`opt_state` is not a state of this step's optimizer for this model: "
            f"{difference}. Make it with "
            "`optimizer.init(eqx.filter(model, eqx.is_inexact_array))` (the "
            "parameters only, not the whole model), with the optimizer given to "
            "`sam_step`."
        )


def _first_difference(expected: Any, got: Any) -> str | None:
    """Where two optimizer states first differ in structure, or in a leaf's type or
    shape, as a sentence naming the path; `None` where they agree. `None` leaves
    (what `eqx.filter` leaves of a model's non-parameters) count as leaves, so that
    a state made from the unfiltered model differs at the first such place."""

    def flat(tree):
        is_none = lambda x: x is None  # noqa: E731
        return jtu.tree_flatten_with_path(tree, is_leaf=is_none)[0]

    def picture(x):
        if x is None:
            return "nothing (`None`: not a parameter)"
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            return f"an array {x.dtype}{list(x.shape)}"
        return f"a {type(x).__name__}"

    ours, theirs = flat(expected), flat(got)
    whole = (
        f" (the optimizer makes {_describe(expected)}, but the step got "
        f"{_describe(got)})"
    )
    for (p, a), (q, b) in zip(ours, theirs):
        if p != q:
            return (
                f"the optimizer's state has {picture(a)} at `opt_state"
                f"{jtu.keystr(p)}` where the step got {picture(b)} at `opt_state"
                f"{jtu.keystr(q)}`{whole}"
            )
        if (a is None) != (b is None) or np.shape(a) != np.shape(b):
            return (
                f"at `opt_state{jtu.keystr(p)}` the optimizer makes {picture(a)}, "
                f"but the step got {picture(b)}"
            )
    if len(ours) != len(theirs):
        longer, n = (
            (ours, "the optimizer's")
            if len(ours) > len(theirs)
            else (
                theirs,
                "the step's",
            )
        )
        path, leaf = longer[min(len(ours), len(theirs))]
        return (
            f"{n} state goes on where the other ends, with {picture(leaf)} at "
            f"`opt_state{jtu.keystr(path)}`{whole}"
        )
    if jax.tree.structure(expected) != jax.tree.structure(got):
        return whole[2:-1]
    return None


def _check_not_empty(batch: tuple) -> None:
    """A `ValueError` for a batch with no examples: its mean loss is NaN, and so
    would be every parameter after the update."""
    if any(np.ndim(a) and np.shape(a)[0] == 0 for a in jax.tree.leaves(batch)):
        shapes = [tuple(np.shape(a)) for a in jax.tree.leaves(batch)]
        raise ValueError(
            f"`sam_step`'s step got an empty batch (arrays of shapes {shapes}): its "
            "loss would be NaN and so would every parameter after the update. Skip "
            "empty batches (e.g. a last, partial one) before the step."
        )


def _split(batch: tuple, m: int) -> tuple[Any, Callable[[Any], tuple]]:
    """Every array of the batch split along its leading axis into `m` equal
    consecutive parts, stacked on a new leading axis; and `join`, which makes one
    micro-batch of those parts and the batch's scalars."""
    sizes = sorted({np.shape(a)[0] for a in jax.tree.leaves(batch) if np.ndim(a)})
    if not sizes:
        got = "no batch" if not jax.tree.leaves(batch) else "only scalars"
        raise ValueError(
            f"`sam_step(micro_batches={m})` splits the batch's arrays along their "
            f"leading axis, but the step got {got}. Pass the batch to the step, "
            "`step(model, state, opt_state, x, y)`, with one row per example, or "
            "use `micro_batches=1`."
        )
    if len(sizes) > 1:
        raise ValueError(
            f"`sam_step(micro_batches={m})` got batch arrays of different leading "
            f"sizes {sizes}; each array of `*batch` must hold one row per example, "
            "so that every micro-batch takes the same examples from each."
        )
    if sizes and sizes[0] % m:
        raise ValueError(
            f"`sam_step(micro_batches={m})` got a batch of {sizes[0]} examples, which "
            f"does not split into {m} equal micro-batches. Use a batch size that "
            "is a multiple of `micro_batches`."
        )
    arrays, others = eqx.partition(batch, lambda a: np.ndim(a) > 0)
    micro = jax.tree.map(
        lambda a: a.reshape((m, a.shape[0] // m) + a.shape[1:]), arrays
    )
    # Scalars (a temperature, a flag) are given whole to every micro-batch.
    return micro, lambda mb: eqx.combine(mb, others)


def _whole_batch(loss_and_rest, params, state, batch) -> _FirstPass:
    """The first pass on the whole batch; the gradient at other parameters starts
    from the same input state."""
    value_and_grad = jax.value_and_grad(loss_and_rest, has_aux=True)
    (loss, rest), grads = value_and_grad(params, copy_state(state), batch)

    def gradient_at(perturbed):
        loss_at = lambda p: loss_and_rest(p, copy_state(state), batch)[0]  # noqa: E731
        return jax.grad(loss_at)(perturbed)

    return _FirstPass(loss, rest, grads, gradient_at, None)


def _in_micro_batches(loss_and_rest, params, state, batch, m, has_aux) -> _FirstPass:
    """The first pass over `m` micro-batches in turn (`lax.scan`), the state
    threaded through them; the gradient at other parameters evaluates each
    micro-batch from the state it saw here. The aux is each micro-batch's, stacked."""
    micro, join = _split(batch, m)
    value_and_grad = jax.value_and_grad(loss_and_rest, has_aux=True)

    def first(carry, mb):
        state, total = carry
        seen = copy_state(state)
        (loss, rest), grads = value_and_grad(params, copy_state(state), join(mb))
        new_state, aux = rest if has_aux else (rest, None)
        return (new_state, optax.tree.add(total, grads)), (loss, aux, seen, grads)

    zero = optax.tree.zeros_like(params)
    try:
        (state, total), (losses, auxes, seen, each) = jax.lax.scan(
            first, (copy_state(state), zero), micro
        )
    except ValueError as error:
        rows = {np.shape(a)[1] for a in jax.tree.leaves(micro)}
        if rows != {1}:
            raise
        # One example per micro-batch: say which setting made the batch that small.
        raise ValueError(
            f"`sam_step(micro_batches={m})` splits each batch into micro-batches "
            f"of one example, and the model refused one example: {error} Use "
            "fewer micro-batches (a batch of at least two examples each), or a "
            "larger batch."
        ) from error

    def gradient_at(perturbed):
        def second(total, mb_and_state):
            mb, mb_state = mb_and_state
            loss_at = lambda p: loss_and_rest(p, mb_state, join(mb))[0]  # noqa: E731
            return optax.tree.add(total, jax.grad(loss_at)(perturbed)), None

        total, _ = jax.lax.scan(second, optax.tree.zeros_like(perturbed), (micro, seen))
        return optax.tree.scale(1 / m, total)

    rest = (state, auxes) if has_aux else state
    grads = optax.tree.scale(1 / m, total)
    return _FirstPass(
        jnp.mean(losses), rest, grads, gradient_at, (micro, seen, each, join)
    )


def _per_micro_batch(loss_and_rest, rule, params, parts):
    """The mean over micro-batches of the gradient at each one's own perturbed
    point, `params + rule(its gradient, params)`, one micro-batch at a time."""
    micro, seen, each, join = parts

    def one(total, part):
        mb, mb_state, grads = part
        loss_at = lambda p: loss_and_rest(p, mb_state, join(mb))[0]  # noqa: E731
        point = perturb(params, rule(grads, params))
        return optax.tree.add(total, jax.grad(loss_at)(point)), None

    total, _ = jax.lax.scan(one, optax.tree.zeros_like(params), (micro, seen, each))
    return optax.tree.scale(1 / len(jax.tree.leaves(each)[0]), total)
