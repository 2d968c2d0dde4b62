from typing import Any, cast

import equinox as eqx
import jax
import optax
from jaxtyping import PyTree

from .._nn._batch_norm import BatchNorm

NORMALISATION_LAYERS = (
    BatchNorm,
    eqx.nn.BatchNorm,
    eqx.nn.LayerNorm,
    eqx.nn.GroupNorm,
    eqx.nn.RMSNorm,
)
"""The layer types whose `weight` and `bias` [`eqx_norm.normalisation_mask`][]
marks."""

_AFFINE = ("weight", "bias")


def _is_normalisation(x: Any) -> bool:
    return isinstance(x, NORMALISATION_LAYERS)


def normalisation_mask(params: optax.Params) -> PyTree[bool]:
    r"""The mask of SAM-ON: `True` on the weight and bias of every normalisation
    layer, `False` on every other parameter.

    Passed as the `mask` of [`eqx_norm.sam`][] (SAM or ASAM) or
    [`eqx_norm.looksam`][], it limits the perturbation to the affine parameters of
    the normalisation layers, and its norm is taken over those parameters only:
    with $N$ the set of normalisation parameters,

    $$e_i = \rho \frac{T_i^2 g_i}{\lVert (T g)_N \rVert_2} \text{ for } i \in N,
    \qquad e_i = 0 \text{ otherwise}.$$

    The gradient that updates the parameters is still that of every parameter, at
    the perturbed point. The perturbed parameters are typically under 1% of the
    model's, yet the paper finds SAM-ON generalises as well as or better than
    perturbing all of them; its radii are larger than SAM's (the perturbation acts
    on far fewer parameters).

    ```python
    optimizer = eqx_norm.sam(
        optax.adam(1e-3), rho=0.5, mask=eqx_norm.normalisation_mask
    )
    ```

    The layers it knows: `eqx_norm.BatchNorm`, `eqx.nn.BatchNorm`,
    `eqx.nn.LayerNorm`, `eqx.nn.GroupNorm` and `eqx.nn.RMSNorm`, wherever they are
    in the tree. A layer without affine parameters (`channelwise_affine=False`,
    `use_weight=False`, `use_bias=False`) contributes nothing; any other array in
    a normalisation layer is `False`.

    ??? cite

        [Normalization Layers Are All That Sharpness-Aware Minimization Needs](
        https://arxiv.org/abs/2306.04226)

        ```bibtex
        @inproceedings{mueller2023normalization,
            title={Normalization Layers Are All That Sharpness-Aware Minimization
                   Needs},
            author={Mueller, Maximilian and Vlaar, Tiffany and Rolnick, David and
                    Hein, Matthias},
            booktitle={Advances in Neural Information Processing Systems},
            year={2023}
        }
        ```

    **Arguments:**

    - `params`: the parameters, e.g. `eqx.filter(model, eqx.is_inexact_array)`
        (`None` leaves stay `None`), or the model itself.

    **Returns:**

    A pytree of Python bools with the structure of `params`.

    **Raises:**

    A `ValueError` if `params` holds no normalisation layer with a weight or a
    bias: a SAM-ON that perturbs nothing would cost a second pass per step for the
    base optimizer's result, so it is refused rather than run.
    """
    if eqx.is_array_like(params) and jax.numpy.ndim(cast(Any, params)) == 0:
        # A scalar where parameters go: `optax.inject_hyperparams` calls every
        # callable argument with the step count, as a schedule.
        raise ValueError(
            "`eqx_norm.normalisation_mask` was called with the scalar "
            f"{params!r}, not parameters: `optax.inject_hyperparams` calls "
            "every function it is given with the step count, as a schedule. "
            "Name the mask static: `optax.inject_hyperparams(eqx_norm.sam, "
            'static_args="mask")(base_optimizer, rho=..., '
            "mask=eqx_norm.normalisation_mask)`."
        )
    found = []

    def mark(x: Any) -> Any:
        if not _is_normalisation(x):
            return False
        mask = jax.tree.map(lambda _: False, x)
        for name in _AFFINE:
            if eqx.is_array(getattr(x, name, None)):
                mask = eqx.tree_at(lambda layer: getattr(layer, name), mask, True)
                found.append(name)
        return mask

    mask = jax.tree.map(mark, params, is_leaf=_is_normalisation)
    if not found:
        raise ValueError(
            "`eqx_norm.normalisation_mask` found no normalisation layer with a "
            "weight or bias in the parameters, so SAM-ON would perturb nothing. "
            "It knows `eqx_norm.BatchNorm`, `eqx.nn.BatchNorm`, `eqx.nn.LayerNorm`, "
            "`eqx.nn.GroupNorm` and `eqx.nn.RMSNorm` with affine parameters (e.g. "
            "`channelwise_affine=True`). For a "
            "model without them, use `mask=None` (every parameter) or a mask of "
            "your own."
        )
    return mask
