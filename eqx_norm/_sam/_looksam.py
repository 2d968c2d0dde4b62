from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike
from jaxtyping import Array, Int, PyTree

from .._checks import (
    INT32_MAX,
    flag,
    non_negative,
    non_negative_at_run_time,
    optax_transformation,
    positive_int,
)
from ._contract import check_update_args, gradient_at_perturbed, sam_rule


class LookSAMState(NamedTuple):
    """The state of [`eqx_norm.looksam`][].

    **Attributes:**

    - `steps`: an int32 scalar, the number of updates so far.
    - `g_v`: the part of the last SAM gradient orthogonal to the plain gradient,
        with the structure of the parameters.
    - `base_state`: the state of the base optimizer.
    """

    steps: Int[Array, ""]
    g_v: optax.Updates
    base_state: optax.OptState


def looksam(
    base_optimizer: optax.GradientTransformation,
    rho: ArrayLike | optax.Schedule = 0.05,
    every: int | np.integer | Array = 5,
    alpha: ArrayLike | optax.Schedule = 0.1,
    adaptive: bool | Array = False,
    eta: ArrayLike = 0.01,
    mask: PyTree | Callable[[optax.Params], PyTree] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""LookSAM: the (A)SAM gradient every `every` steps, and in between the plain
    gradient plus the SAM gradient's last known part orthogonal to it.

    With $g$ the gradient at $w$ on step $t$ (counting from 0): if $t$ is a multiple of
    `every`, the SAM gradient $g_s$ is computed at the perturbed point exactly as
    [`eqx_norm.sam`][] does, the base optimizer is given $g_s$, and

    $$g_v = g_s - \frac{\langle g, g_s \rangle}{\lVert g \rVert^2} g$$

    is stored (zero where $g = 0$). On the other steps the base optimizer is given

    $$g + \alpha \frac{\lVert g \rVert}{\lVert g_v \rVert} g_v$$

    (just $g$ where $g_v = 0$), with no second pass. Under `jax.jit` the choice is a
    `lax.cond`, so the steps in between really skip the second pass and a run costs
    about $1 + 1/\text{every}$ plain steps. Under `jax.vmap` (an ensemble of models,
    say) a `cond` on a batched step count becomes a `select` and both branches run
    on every step; the step count of a vmapped ensemble trained in lockstep is not
    batched, so this only happens when the states are stepped apart. `alpha=0` is
    "SAM every `every` steps".

    `alpha` sets the reused part's norm relative to the gradient's, so it should be
    about the ratio $\lVert g_v \rVert / \lVert g \rVert$ that SAM itself produces
    (the state keeps $g_v$ for measuring it). That ratio depends on `rho` and the
    model: on the experiment's CNN at `rho=0.05` it is about 0.13 (10th to 90th
    percentile 0.09 to 0.21), where the paper's `alpha=0.7` (tuned for large-batch
    vision transformers) adds about five times SAM's own correction and trained
    worse than the base optimizer, while `alpha=0.1` kept SAM's gain. So the
    default is 0.1; for another model or radius, measure the ratio and set
    `alpha` near it.

    Used exactly like `eqx_norm.sam`, through [`eqx_norm.sam_step`][] (which keeps
    BatchNorm statistics from the first pass) or with `grad_fn=` by hand. Norms and
    inner products are taken over all parameters, in float32.

    ??? cite

        [Towards Efficient and Scalable Sharpness-Aware Minimization](
        https://arxiv.org/abs/2203.02714)

        ```bibtex
        @inproceedings{liu2022looksam,
            title={Towards Efficient and Scalable Sharpness-Aware Minimization},
            author={Liu, Yong and Mai, Siqi and Chen, Xiangning and Hsieh, Cho-Jui
                    and You, Yang},
            booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision
                       and Pattern Recognition},
            pages={12360--12370},
            year={2022}
        }
        ```

    **Arguments:**

    - `base_optimizer`, `rho`, `adaptive`, `eta`, `mask`: as in `eqx_norm.sam`.
    - `every`: how often the SAM gradient is computed, a positive int (1: every
        step, which is `eqx_norm.sam`).
    - `alpha`: the weight of the reused orthogonal part, at least 0; a float or a
        schedule (a callable of the update count, as `rho`). The paper's value is
        0.7; the default 0.1 is the ratio measured here (above).

    **Returns:**

    An `optax.GradientTransformationExtraArgs` whose state is a
    [`eqx_norm.LookSAMState`][].

    **Raises:**

    As `eqx_norm.sam`; a `ValueError` for an `every` below 1 or above 2**31 - 1
    (what an int32 step count reaches), or an `alpha` that is NaN, infinite or
    negative; a `TypeError` for an `every` that is not an int.
    """
    optax_transformation(base_optimizer, "eqx_norm.looksam(optax.sgd(0.1), every=5)")
    non_negative("rho", rho, "0.05")
    non_negative("eta", eta, "0.01", schedule=False)
    non_negative("alpha", alpha, "0.1")
    adaptive = flag("adaptive", adaptive)
    every = _check_every(every)
    base = optax.with_extra_args_support(base_optimizer)

    def init_fn(params: optax.Params) -> LookSAMState:
        return LookSAMState(
            steps=jnp.zeros((), jnp.int32),
            g_v=jax.tree.map(jnp.zeros_like, params),
            base_state=base.init(params),
        )

    def update_fn(
        updates, state: LookSAMState, params=None, *, grad_fn=None, **extra_args
    ):
        grad_fn, params = check_update_args("looksam", grad_fn, params)
        g = updates
        g_norm2 = _dot(g, g)

        def with_second_pass(g_v_old):
            del g_v_old
            radius = rho(state.steps) if callable(rho) else rho
            radius = non_negative_at_run_time("rho", radius, "looksam")
            rule = sam_rule(radius, adaptive, eta, mask)
            g_s = gradient_at_perturbed(grad_fn, rule, g, params)
            coef = jnp.where(
                g_norm2 > 0, _dot(g, g_s) / jnp.where(g_norm2 > 0, g_norm2, 1), 0
            )
            g_v = jax.tree.map(
                lambda s, p: jnp.where(
                    g_norm2 > 0, s - (coef * p).astype(s.dtype), 0
                ).astype(p.dtype),
                g_s,
                g,
            )
            return g_s, g_v

        def reusing(g_v):
            v_norm2 = _dot(g_v, g_v)
            weight = alpha(state.steps) if callable(alpha) else alpha
            weight = non_negative_at_run_time("alpha", weight, "looksam")
            weight = jnp.asarray(weight, jnp.float32)  # the norms' dtype
            factor = jnp.where(
                v_norm2 > 0,
                weight * jnp.sqrt(g_norm2 / jnp.where(v_norm2 > 0, v_norm2, 1)),
                0,
            )
            direction = jax.tree.map(
                lambda p, v: p + (factor * v).astype(p.dtype), g, g_v
            )
            return direction, g_v

        direction, g_v = jax.lax.cond(
            state.steps % every == 0, with_second_pass, reusing, state.g_v
        )
        new_updates, base_state = base.update(
            direction, state.base_state, params, **extra_args
        )
        steps = jnp.asarray(optax.safe_increment(state.steps))
        return new_updates, LookSAMState(steps, g_v, base_state)

    return optax.GradientTransformationExtraArgs(
        init_fn,
        update_fn,  # pyright: ignore[reportArgumentType]
    )


def _dot(a: optax.Updates, b: optax.Updates) -> Array:
    """The inner product of two pytrees, in float32."""
    a, b = optax.tree.cast(a, jnp.float32), optax.tree.cast(b, jnp.float32)
    return jnp.asarray(optax.tree.vdot(a, b), jnp.float32)


def _check_every(every: Any) -> Any:
    """`every` as a Python int, which must be positive and reachable by an int32
    step count; a traced one (under `optax.inject_hyperparams`) is checked by no
    one and returned as it is."""
    if isinstance(every, jax.core.Tracer):  # pyright: ignore[reportAttributeAccessIssue]
        return every
    return positive_int("every", every, "every=5", maximum=INT32_MAX)
