"""Where a SAM-family optimizer's perturbation takes its gradient from, in
`sam_step`: the batch's mean gradient, each device's own, or each micro-batch's own:
one `AbstractStepGradient` each, chosen once when the step is made."""

import abc
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from ._contract import AbstractStepGradient, perturb
from ._passes import FirstPass, per_micro_batch
from ._step_checks import MULTI_STEPS


class _PassGradient(AbstractStepGradient):
    """What the three sources share: the plain gradient at other parameters,
    parameters that `optax.masked` left out (filled from the step's own), the mean
    across devices, and the refusal inside an accumulating `optax.MultiSteps`. A
    source says only whose gradient feeds a rule (`_at_rule`)."""

    option: ClassVar[str | None]
    """The `sam_step` option that chose the source (`None`: the default)."""

    def __init__(self, first: FirstPass, loss_and_rest, mean, accumulating, params):
        self.first = first
        self.loss_and_rest = loss_and_rest
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
        return eqx.error_if(grads, self.accumulating, MULTI_STEPS)

    def __call__(self, params):
        if self.option is not None:
            raise ValueError(
                f"`sam_step(..., {self.option})` applies each part's own gradient to "
                "the optimizer's perturbation rule, but this optimizer called "
                "`grad_fn` with a point it chose itself. Get the second gradient "
                "with `eqx_norm.perturbed_gradient(grad_fn, rule, grads, params)`, "
                "as `eqx_norm.sam` does."
            )
        out = self.first.gradient_at(self._whole(params))
        return self._refuse_accumulation(self.mean(_like(out, params)))

    def perturbed(self, rule, grads, params):
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
        out = self._at_rule(rule, grads, params)
        return self._refuse_accumulation(self.mean(_like(out, masked)))

    @abc.abstractmethod
    def _at_rule(self, rule, grads, params):
        """This step's gradient at the points `rule` gives, before the mean across
        devices."""


class MeanGradient(_PassGradient):
    """The default: the rule is applied to the gradient the optimizer was given
    (the batch's, averaged across devices)."""

    option: ClassVar[str | None] = None

    def _at_rule(self, rule, grads, params):
        return self.first.gradient_at(perturb(params, rule(grads, params)))


class DeviceGradient(_PassGradient):
    """`per_device_perturbation=True`: each device applies the rule to its own
    gradient; only the gradients at the perturbed points are averaged."""

    option: ClassVar[str | None] = "per_device_perturbation=True"

    def _at_rule(self, rule, grads, params):
        own = self.first.grads
        return self.first.gradient_at(perturb(params, rule(own, params)))


class MicroBatchGradient(_PassGradient):
    """`perturbation="per-micro-batch"`: each micro-batch applies the rule to its
    own gradient, from the state it saw; the gradients at its points are
    averaged."""

    option: ClassVar[str | None] = 'perturbation="per-micro-batch"'

    def _at_rule(self, rule, grads, params):
        first = self.first
        if first.parts is None:  # one micro-batch: this device's whole batch
            own = first.grads
            return first.gradient_at(perturb(params, rule(own, params)))
        return per_micro_batch(self.loss_and_rest, rule, params, first.parts)


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
