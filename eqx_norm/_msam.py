from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike
from jaxtyping import Array, Int

from ._checks import non_negative
from ._perturb import NextPerturbation

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
        update (zeros before the first).
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


def _the_momentum(base_state: optax.OptState) -> optax.Updates:
    """The one momentum in the base optimizer's state, or a `ValueError` naming
    `base_optimizer` where there is none, or more than one."""
    found = _momenta(base_state)
    if len(found) == 1:
        return found[0]
    which = "no" if not found else f"{len(found)}"
    raise ValueError(
        f"`eqx_norm.msam` found {which} momentum in the state of `base_optimizer`; "
        "it perturbs along the one momentum of the base optimizer: the `trace` of "
        "an `optax.TraceState` (`optax.sgd(learning_rate, momentum=0.9)`) or the "
        "first moment `mu` of an `optax.ScaleByAdamState` (`optax.adam`, "
        "`optax.adamw`, `optax.nadam`, ...). Give it an optimizer with exactly one, "
        "e.g. `eqx_norm.msam(optax.sgd(0.1, momentum=0.9), rho=0.3)`."
    )


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
    (inside `optax.chain`, `optax.inject_hyperparams` and the like):

    - the `trace` of an `optax.TraceState`, $v_{t+1} = \mu v_t + g_t$:
        `optax.sgd(lr, momentum=mu)` (Nesterov or not: the buffer, as the authors'
        code), `optax.trace`;
    - the first moment `mu` of an `optax.ScaleByAdamState`,
        $m_{t+1} = \beta_1 m_t + (1 - \beta_1) g_t$ (not debiased: the norm removes
        the scale), as the authors' AdamW variant: `optax.adam`, `optax.adamw`,
        `optax.nadam`, `optax.radam`, `optax.lamb` and the others built on
        `optax.scale_by_adam`.

    A base optimizer with none of them (`optax.sgd` without momentum,
    `optax.rmsprop`, ...) or with more than one is refused when the state is made.

    The perturbation is kept in the state as an [`eqx_norm.NextPerturbation`][], so
    [`eqx_norm.sam_step`][] takes the step's single pass at $w_t + e_t$ (BatchNorm
    statistics come from that pass), gives the gradient there to `update`, and the
    parameters it returns, and the user holds, stay unperturbed: no "move back"
    before evaluating or saving. Without `sam_step`, evaluate the gradient at
    `eqx_norm.pass_point(opt_state, params)` and pass it to
    `update(grads, opt_state, params)`.

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
    is made, a `ValueError` naming `base_optimizer` if its state holds no momentum
    or more than one.
    """
    if not isinstance(base_optimizer, optax.GradientTransformation):
        raise ValueError(
            "`base_optimizer` must be an Optax gradient transformation with a "
            "momentum, e.g. `eqx_norm.msam(optax.sgd(0.1, momentum=0.9), rho=0.3)`; "
            f"got {type(base_optimizer)}."
        )
    non_negative("rho", rho, "0.3")
    base = optax.with_extra_args_support(base_optimizer)

    def init_fn(params: optax.Params) -> MSAMState:
        base_state = base.init(params)
        _the_momentum(base_state)
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
        momentum = optax.tree.cast(_the_momentum(base_state), jnp.float32)
        scale = -jnp.asarray(radius, jnp.float32) / (
            optax.tree.norm(momentum) + jnp.float32(_EPS)
        )
        perturbation = jax.tree.map(
            lambda v, old: (scale * v).astype(old.dtype),
            momentum,
            state.next.perturbation,
        )
        return new_updates, MSAMState(steps, NextPerturbation(perturbation), base_state)

    return optax.GradientTransformationExtraArgs(
        init_fn,
        update_fn,  # pyright: ignore[reportArgumentType]
    )
