import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike
from jaxtyping import Array, Int

from .._checks import non_negative, non_negative_at_run_time, optax_transformation
from ._contract import NextPerturbation

# Optax's state types that hold a momentum, and the attribute that holds it.
_MOMENTA: tuple[tuple[type, str], ...] = (
    (optax.TraceState, "trace"),
    (optax.ScaleByAdamState, "mu"),
)

# Added to the momentum's norm, as in the authors' code: no division by zero, and
# a zero momentum (the first step) perturbs by zero.
_EPS = 1e-12


class MSAMState(NamedTuple):
    """The state of [`eqx_norm.msam`][].

    **Attributes:**

    - `steps`: an int32 scalar, the number of updates so far (what a `rho` schedule
        is evaluated at).
    - `next`: the [`eqx_norm.NextPerturbation`][] of the next step,
        $-\\rho v / (\\lVert v \\rVert + 10^{-12})$ from the momentum $v$ after this
        update, oriented as the gradient (zeros before the first).
    - `base_state`: the state of the base optimizer.
    """

    steps: Int[Array, ""]
    next: NextPerturbation
    base_state: optax.OptState


def _is_momentum_state(x: Any) -> bool:
    return any(isinstance(x, kind) for kind, _ in _MOMENTA)


def _momenta(base_state: optax.OptState) -> list[optax.Updates]:
    """Every momentum in the base optimizer's state, in tree order."""
    found = []
    for x in jax.tree.leaves(base_state, is_leaf=_is_momentum_state):
        for kind, attribute in _MOMENTA:
            if isinstance(x, kind):
                found.append(getattr(x, attribute))
                break
    return found


def _no_momentum(found: int) -> ValueError:
    which = "no" if not found else f"{found}"
    return ValueError(
        f"`eqx_norm.msam` found {which} momentum in the state of `base_optimizer` "
        "for a parameter; it perturbs along the one momentum of each parameter: the "
        "`trace` of an `optax.TraceState` (`optax.sgd(learning_rate, momentum=0.9)`, "
        "`optax.rmsprop(learning_rate, momentum=0.9)`) or the first moment `mu` of "
        "an `optax.ScaleByAdamState` (`optax.adam`, `optax.adamw`, `optax.nadam`, "
        "...). Give it an optimizer with exactly one per parameter, e.g. "
        "`eqx_norm.msam(optax.sgd(0.1, momentum=0.9), rho=0.3)`; parameters that "
        "`optax.masked` or `optax.multi_transform` leave out are not perturbed."
    )


def _per_parameter(params: optax.Params, base_state: optax.OptState) -> list[list]:
    """For each leaf of `params`, the momenta of the base optimizer's state that
    hold it, as `(index of the momentum, array)`: none where the base optimizer
    leaves the parameter out (`optax.masked`, `optax.multi_transform`)."""
    found = _momenta(base_state)
    structure = jax.tree.structure(params)
    out: list[list] = [[] for _ in range(structure.num_leaves)]
    for k, momentum in enumerate(found):
        for i, leaf in enumerate(structure.flatten_up_to(momentum)):
            if not isinstance(leaf, optax.MaskedNode):
                out[i].append((k, leaf))
    if not found or any(len(held) > 1 for held in out):
        raise _no_momentum(max(len(found), 1) if found else 0)
    if not any(out):
        raise ValueError(
            "`eqx_norm.msam` found a momentum in the state of `base_optimizer` for "
            "no parameter (every parameter is left out, by `optax.masked` or "
            "`optax.multi_transform`, or there are no parameters), so it would "
            "perturb nothing. Give it the parameters to train, with the optimizer "
            "keeping a momentum for at least one."
        )
    return out


def _directions(base, params: optax.Params) -> list[Any]:
    """For each momentum of the base optimizer, +1 where it is a trace of the
    gradients (the update descends against it: `optax.sgd`, `optax.adam`) and -1
    where it is a trace of the updates (it descends along it: the momentum of
    `optax.rmsprop` and `optax.lars`, kept after the learning rate's negative
    scale). Read from one update of a gradient of ones at zero parameters, made at
    trace time; a `ValueError` naming `base_optimizer` where that leaves a momentum
    at zero (a learning rate of 0 at the first step scales it away)."""
    with jax.ensure_compile_time_eval():
        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), p.dtype), params)
        ones = jax.tree.map(lambda p: jnp.ones(jnp.shape(p), p.dtype), params)
        _, state = base.update(ones, base.init(zeros), zeros)
        signs = []
        for momentum in _momenta(state):
            held = [
                jnp.sum(leaf.astype(jnp.float32)) for leaf in jax.tree.leaves(momentum)
            ]
            total = sum(held, jnp.float32(0))
            try:
                value = float(total)
            except jax.errors.ConcretizationTypeError:  # traced hyperparameters
                signs.append(jnp.sign(total))
                continue
            if not value or not math.isfinite(value):
                raise ValueError(
                    "`eqx_norm.msam` cannot tell which way the momentum of "
                    "`base_optimizer` points: after one update with a gradient of "
                    f"ones it sums to {value}. A learning rate of 0 at the first "
                    "step (a warm-up from 0) scales a momentum kept after it away: "
                    "start the warm-up above 0, e.g. `init_value=1e-6`."
                )
            signs.append(1.0 if value > 0 else -1.0)
    return signs


def _ascent(
    params: optax.Params, base_state: optax.OptState, signs: list[Any]
) -> optax.Updates:
    """The momentum of every parameter, oriented as the gradient (zero where the
    base optimizer leaves a parameter out), in float32."""
    held = _per_parameter(params, base_state)
    leaves = [
        jnp.zeros(jnp.shape(p), jnp.float32)
        if not h
        else signs[h[0][0]] * h[0][1].astype(jnp.float32)
        for p, h in zip(jax.tree.leaves(params), held)
    ]
    return jax.tree.unflatten(jax.tree.structure(params), leaves)


def msam(
    base_optimizer: optax.GradientTransformation,
    rho: ArrayLike | optax.Schedule = 0.3,
) -> optax.GradientTransformationExtraArgs:
    r"""Momentum-SAM: SAM's ascent along the base optimizer's momentum, known before
    the step, so that a step costs one forward and backward pass, as the base
    optimizer's.

    With $w_t$ the parameters and $v_t$ the base optimizer's momentum after step
    $t - 1$ ($v_0 = 0$), step $t$ takes its one gradient at the perturbed point and
    applies the base optimizer's update to the unperturbed parameters:

    $$e_t = -\rho \frac{v_t}{\lVert v_t \rVert_2 + 10^{-12}}, \qquad
    g_t = \nabla L(w_t + e_t), \qquad
    w_{t+1} = w_t + \text{base}(g_t).$$

    For `optax.sgd(lr, momentum=mu)`, $v_{t+1} = \mu v_t + g_t$ and
    $w_{t+1} = w_t - \text{lr}\, v_{t+1}$: the update descends along $v$, the
    perturbation ascends against it (as SAM's $+\rho g / \lVert g \rVert$ ascends
    along the gradient), and its length is $\rho$, whatever the learning rate.
    These are the authors' `MSAM` and `AdamW_MSAM` (their code adds $10^{-12}$ to
    the norm likewise, and takes the norm over all parameters).

    What "the momentum" is, found by type anywhere in the base optimizer's state
    (inside `optax.chain`, `optax.inject_hyperparams`, `optax.masked`,
    `optax.multi_transform` and the like):

    - the `trace` of an `optax.TraceState`: `optax.sgd(lr, momentum=mu)` (Nesterov
        or not: the buffer, as the authors' code), `optax.trace`, and the momentum
        of `optax.rmsprop(lr, momentum=mu)` (centred or not) and `optax.lars`;
    - the first moment `mu` of an `optax.ScaleByAdamState`,
        $m_{t+1} = \beta_1 m_t + (1 - \beta_1) g_t$ (not debiased: the norm removes
        the scale), as the authors' AdamW variant: `optax.adam`, `optax.adamw`,
        `optax.nadam`, `optax.radam`, `optax.lamb` and the others built on
        `optax.scale_by_adam`.

    Which way a momentum points depends on where it sits in the chain: `optax.sgd`
    and `optax.adam` keep a trace of the gradients (the update descends against
    it), while `optax.rmsprop` and `optax.lars` keep theirs after the learning
    rate's negative scale, a trace of the updates (the update descends along it).
    `msam` reads the direction from one update of a gradient of ones at zero
    parameters, made once when the state is made and when the update is traced
    (nothing of it runs in the compiled step), and orients $v$ as the gradient, so
    that the perturbation always points along the step just taken, as the
    authors' does. Parameters that the base optimizer leaves out (`optax.masked`,
    `optax.multi_transform` with `optax.set_to_zero()` for frozen ones) have no
    momentum and are not perturbed; the norm is taken over the others.

    A base optimizer with no momentum (`optax.sgd` without momentum,
    `optax.rmsprop` without it, ...), with two for one parameter, or whose momentum
    a first update leaves at zero (a learning rate of 0 at the first step) is
    refused when the state is made, naming `base_optimizer`.

    The perturbation is kept in the state as an [`eqx_norm.NextPerturbation`][], so
    [`eqx_norm.sam_step`][] takes the step's single pass at $w_t + e_t$, gives the
    gradient there to `update`, and the parameters it returns, and the user holds,
    stay unperturbed: no "move back" before evaluating or saving. Without
    `sam_step`, evaluate the gradient at `eqx_norm.pass_point(opt_state, params)`
    and pass it to `update(grads, opt_state, params)`.

    BatchNorm statistics come from that one pass, so the running statistics are
    those of the perturbed point $w_t + e_t$, not of the parameters you hold.
    Before evaluating or serving, recompute them at the parameters with
    [`eqx_norm.recalibrate`][] (as the authors' code does with an extra epoch at
    the end); the SAM comparison evaluates every method that way.

    The perturbation is decided one step ahead: `update` at step $t$ computes
    $e_{t+1}$ with the radius at count $t + 1$. So a `rho` schedule is evaluated one
    count ahead, and a `rho` injected with `optax.inject_hyperparams` (set in the
    state before an update) first reaches the pass of the step after that update.

    Differences from the authors' code: a `rho` schedule is evaluated at the count
    of the step that takes the gradient (their SGD code moves back with the radius
    of the next step); weight decay in the base optimizer acts on the unperturbed
    parameters (their SGD code decays the perturbed ones; their AdamW code, as
    here, the unperturbed); their code runs an extra epoch at the end to recompute
    BatchNorm statistics at the unperturbed parameters, which
    [`eqx_norm.recalibrate`][] does here.

    ??? cite

        [Momentum-SAM: Sharpness Aware Minimization without Computational
        Overhead](https://arxiv.org/abs/2401.12033)

        ```bibtex
        @article{becker2024momentumsam,
            title={Momentum-SAM: Sharpness Aware Minimization without
                   Computational Overhead},
            author={Becker, Marlon and Altrock, Frederick and Risse, Benjamin},
            journal={arXiv preprint arXiv:2401.12033},
            year={2024}
        }
        ```

    **Arguments:**

    - `base_optimizer`: the Optax optimizer whose momentum gives the perturbation
        and which turns the gradient into the update.
    - `rho`: the length of the perturbation, at least 0; a float or a schedule (a
        callable of the update count). The authors use 0.3 to 3 with SGD and 1 to 3
        with AdamW: larger than SAM's, as the momentum is a steadier direction than
        one batch's gradient.

    **Returns:**

    An `optax.GradientTransformationExtraArgs` whose state is a
    [`eqx_norm.MSAMState`][]; `update(grads, state, params=None, **extra_args)`
    needs no `grad_fn`.

    **Raises:**

    A `ValueError` for a `rho` that is NaN, infinite or negative, or a
    `base_optimizer` that is not an Optax gradient transformation; when the state
    is made, a `ValueError` naming `base_optimizer` if its state holds no momentum,
    two for one parameter, or one that points nowhere after a first update. When
    an update runs, a runtime error if a `rho` schedule or injected `rho` is NaN,
    infinite or negative.
    """
    optax_transformation(
        base_optimizer, "eqx_norm.msam(optax.sgd(0.1, momentum=0.9), rho=0.3)"
    )
    non_negative("rho", rho, "0.3")
    base = optax.with_extra_args_support(base_optimizer)

    def init_fn(params: optax.Params) -> MSAMState:
        base_state = base.init(params)
        _per_parameter(params, base_state)
        _directions(base, params)
        zeros = jax.tree.map(jnp.zeros_like, params)
        return MSAMState(jnp.zeros((), jnp.int32), NextPerturbation(zeros), base_state)

    def update_fn(
        updates: optax.Updates,
        state: MSAMState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, MSAMState]:
        new_updates, base_state = base.update(
            updates, state.base_state, params, **extra_args
        )
        steps = jnp.asarray(optax.safe_increment(state.steps))
        radius = rho(steps) if callable(rho) else rho
        radius = non_negative_at_run_time("rho", radius, "msam")
        like = state.next.perturbation  # the parameters' structure, shapes, dtypes
        momentum = _ascent(like, base_state, _directions(base, like))
        scale = -jnp.asarray(radius, jnp.float32) / (
            optax.tree.norm(momentum) + jnp.float32(_EPS)
        )
        perturbation = jax.tree.map(
            lambda v, old: (scale * v).astype(old.dtype), momentum, like
        )
        return new_updates, MSAMState(steps, NextPerturbation(perturbation), base_state)

    return optax.GradientTransformationExtraArgs(
        init_fn,
        update_fn,  # pyright: ignore[reportArgumentType]
    )
