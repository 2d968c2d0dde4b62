from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
import optax
from jax.typing import ArrayLike
from jaxtyping import Array, Int, PyTree

from .._checks import (
    flag,
    non_negative,
    non_negative_at_run_time,
    optax_transformation,
)
from ._contract import check_update_args, gradient_at_perturbed, sam_rule


class SAMState(NamedTuple):
    """The state of [`eqx_norm.sam`][].

    **Attributes:**

    - `steps`: an int32 scalar, the number of updates so far (what a `rho` schedule
        is evaluated at).
    - `base_state`: the state of the base optimizer.
    """

    steps: Int[Array, ""]
    base_state: optax.OptState


def sam(
    base_optimizer: optax.GradientTransformation,
    rho: ArrayLike | optax.Schedule = 0.05,
    adaptive: bool | Array = False,
    eta: ArrayLike = 0.01,
    mask: PyTree | Callable[[optax.Params], PyTree] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Sharpness-aware minimisation (SAM) and its adaptive form (ASAM).

    Given the gradient $g$ at the parameters $w$, SAM moves to the worst nearby point
    and returns the base optimizer's update computed from the gradient there:

    $$e = \rho \frac{T^2 g}{\lVert T g \rVert_2}, \qquad
    \text{update} = \text{base}\left(\nabla L(w + e)\right),$$

    with $T = 1$ for SAM, giving $e = \rho g / \lVert g \rVert$, and $T = |w| + \eta$
    elementwise for ASAM (`adaptive=True`). A `mask` limits the perturbation to some
    parameters (for example the normalisation layers only: SAM-ON); the norm is then
    taken over those parameters only. Where the gradient is zero, $e = 0$.

    `update(grads, state, params, *, grad_fn)` needs `grad_fn(perturbed_params)`, the
    gradient at the perturbed parameters. With Equinox models that carry a state,
    [`eqx_norm.sam_step`][] builds the whole step, two passes included, and keeps
    BatchNorm statistics from the first pass only.

    ```python
    opt = eqx_norm.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    updates, opt_state = opt.update(grads, opt_state, params, grad_fn=grad_fn)
    ```

    Gradient clipping, learning-rate schedules and the like belong in the base
    optimizer: they then act on the gradient that is applied, not on the direction
    of the perturbation. The transformation works inside `optax.chain` and under
    `optax.inject_hyperparams` (`rho`, `eta` and `adaptive` may be injected).

    ??? cite

        [Sharpness-Aware Minimization for Efficiently Improving
        Generalization](https://arxiv.org/abs/2010.01412)

        ```bibtex
        @inproceedings{foret2021sharpnessaware,
            title={Sharpness-aware Minimization for Efficiently Improving
                   Generalization},
            author={Pierre Foret and Ariel Kleiner and Hossein Mobahi and
                    Behnam Neyshabur},
            booktitle={International Conference on Learning Representations},
            year={2021}
        }
        ```

        [ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning
        of Deep Neural Networks](https://arxiv.org/abs/2102.11600)

        ```bibtex
        @inproceedings{kwon2021asam,
            title={ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
                   Learning of Deep Neural Networks},
            author={Kwon, Jungmin and Kim, Jeongseop and Park, Hyunseo and
                    Choi, In Kwon},
            booktitle={International Conference on Machine Learning},
            pages={5905--5914},
            year={2021}
        }
        ```

    **Arguments:**

    - `base_optimizer`: the Optax optimizer that turns the perturbed gradient into
        an update.
    - `rho`: the radius of the perturbation, at least 0; a float or a schedule (a
        callable of the update count).
    - `adaptive`: `False` for SAM, `True` for ASAM.
    - `eta`: ASAM's offset in $T = |w| + \eta$, at least 0.
    - `mask`: a pytree of bools with the structure of the parameters (or a prefix
        of it), or a callable of the parameters returning one: `True` where a
        parameter is perturbed. `None` perturbs every parameter.

    **Returns:**

    An `optax.GradientTransformationExtraArgs` whose state is a
    [`eqx_norm.SAMState`][].

    **Raises:**

    A `ValueError` for a `rho` or `eta` that is NaN, infinite or negative (of any
    concrete real type: Python, NumPy or JAX), or a `base_optimizer` that is not an
    Optax gradient transformation; when updating, a `ValueError` if `grad_fn` or
    `params` is missing.
    """
    optax_transformation(base_optimizer, "eqx_norm.sam(optax.sgd(0.1), rho=0.05)")
    non_negative("rho", rho, "0.05")
    non_negative("eta", eta, "0.01", schedule=False)
    adaptive = flag("adaptive", adaptive)
    base = optax.with_extra_args_support(base_optimizer)

    def init_fn(params: optax.Params) -> SAMState:
        return SAMState(steps=jnp.zeros((), jnp.int32), base_state=base.init(params))

    def update_fn(updates, state: SAMState, params=None, *, grad_fn=None, **extra_args):
        grad_fn, params = check_update_args("sam", grad_fn, params)
        radius = rho(state.steps) if callable(rho) else rho
        radius = non_negative_at_run_time("rho", radius, "sam")
        rule = sam_rule(radius, adaptive, eta, mask)
        new_updates, base_state = base.update(
            gradient_at_perturbed(grad_fn, rule, updates, params),
            state.base_state,
            params,
            **extra_args,
        )
        steps = jnp.asarray(optax.safe_increment(state.steps))
        return new_updates, SAMState(steps=steps, base_state=base_state)

    return optax.GradientTransformationExtraArgs(
        init_fn,
        update_fn,  # pyright: ignore[reportArgumentType]
    )
