"""The statistics strategies (`eqx_norm.Approach` and its subclasses): their
hyperparameters checked at construction, their arithmetic at the edges (the first
step, constant channels, huge variances, a saturated counter), and a user's own
strategy written on the base class."""

import inspect
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_norm

from ..helpers import apply, batches, make, stored

F64 = np.float64


@pytest.mark.parametrize(
    "make_approach, message",
    [
        (lambda: eqx_norm.Renorm(r_max=0.5), "`r_max` must be at least 1"),
        (lambda: eqx_norm.Renorm(r_max=float("nan")), "`r_max` must be at least 1"),
        (lambda: eqx_norm.Renorm(d_max=-1.0), "`d_max` must be at least 0"),
    ],
    ids=["small-r_max", "nan-r_max", "negative-d_max"],
)
def test_approach_errors_name_the_argument(make_approach, message):
    with pytest.raises(ValueError, match=message):
        make_approach()


@pytest.mark.parametrize(
    "max_count, error",
    [
        (2**40, ValueError),
        (2**31, ValueError),
        (0, ValueError),
        (-5, ValueError),
        (2.5, TypeError),
        (True, TypeError),
        ("256", TypeError),
    ],
)
def test_running_max_count_is_validated_at_construction(max_count, error):
    """Regression: max_count=2**40 was accepted, then the first call raised an
    OverflowError that did not name it."""
    # A wrong type meets jaxtyping's check first in this suite, whose message
    # names the parameter too (`test_package.py` checks the package's own).
    message = {
        ValueError: "`max_count` must be a whole number of values from 1 to",
        TypeError: "max_count",
    }[error]
    with pytest.raises(error, match=message):
        eqx_norm.Running(max_count=max_count)


def test_running_counter_saturates_instead_of_wrapping():
    """Regression: with max_count 2**31 - 1 the int32 counter wrapped negative."""
    top = 2**31 - 1
    bn, state = make(3, approach=eqx_norm.Running(max_count=top))
    stats = stored(state, bn.state_index)
    state = state.set(bn.state_index, stats._replace(counter=jnp.int32(top - 10)))
    x = 5 + jax.random.normal(jax.random.key(0), (64, 3))
    for _ in range(2):
        _, state = apply(bn, x, state)
        assert int(stored(state, bn.state_index).counter) == top


def test_running_does_not_overflow_at_large_variance():
    """Regression: `c * var + n * var` overflowed float32 for data of standard
    deviation 1.2e18 once the count reached its cap."""
    bn, state = make(3, approach="running")
    x = 1.2e18 * jax.random.normal(jax.random.key(0), (64, 3))
    y = x
    for _ in range(6):
        y, state = apply(bn, x, state)
    mean, var = bn.statistics(state)
    assert np.all(np.isfinite(mean)) and np.all(np.isfinite(var))
    np.testing.assert_allclose(var, np.asarray(x, F64).var(0), rtol=1e-5)
    assert np.all(np.isfinite(y))


@pytest.mark.parametrize(
    "approach", ["batch", "adam-correction", "smooth-start", "renorm"]
)
@pytest.mark.parametrize("momentum", [0.99, 0.999])
def test_constant_first_batch_channel_stores_zero_variance(approach, momentum):
    """Regression: the first step's debiasing weight was 1.0000129 (momentum 0.999)
    in float32, so a channel that is constant in the first batch (a dead ReLU, a
    zero-padded channel) was stored with variance -1.3e-5 and inference gave NaN.
    Now the first step stores the batch statistics exactly."""
    bn, state = make(3, approach=approach, momentum=momentum)
    x = jax.random.normal(jax.random.key(0), (8, 3)) * jnp.array([0.0, 1.0, 3.0]) + 2
    _, state = apply(bn, x, state)
    mean, var = bn.statistics(state)
    assert float(var[0]) == 0.0
    xs = np.asarray(x, F64)
    expected_var = xs.var(0, ddof=1 if approach in ("batch", "renorm") else 0)
    np.testing.assert_allclose(mean, xs.mean(0), rtol=2e-7)
    np.testing.assert_allclose(var, expected_var, rtol=4e-6)  # float32 moments
    y, _ = apply(bn, x, state, inference=True)
    assert np.all(np.isfinite(y))


@pytest.mark.parametrize("approach", ["ema", "adam-correction", "smooth-start"])
def test_constant_channel_stays_finite_in_inference_over_many_steps(approach):
    bn, state = make(2, approach=approach, momentum=0.999)
    for k in jax.random.split(jax.random.key(0), 5):
        x = jnp.stack([jnp.zeros(16), jax.random.normal(k, (16,))], axis=1)
        _, state = apply(bn, x, state)
    _, var = bn.statistics(state)
    assert float(var[0]) == 0.0
    y, _ = apply(bn, jnp.ones((4, 2)), state, inference=True)
    assert np.all(np.isfinite(y))


# ------------------------------------------------------------ a user's strategy


def test_user_strategy_in_a_dozen_lines(getkey):
    """The strategy written in `eqx_norm.Approach`'s docstring, run from there,
    against the float64 formula it states."""
    doc = inspect.getdoc(eqx_norm.Approach) or ""
    code = re.search(r"```python\n(.*?)```", doc, flags=re.DOTALL)
    assert code is not None
    namespace: dict[str, Any] = {"eqx_norm": eqx_norm}
    exec(code.group(1), namespace)
    HalfAndHalf = namespace["HalfAndHalf"]

    bn, state = make(3, approach=HalfAndHalf(), momentum=0.5)
    r_mean, r_var = np.zeros(3), np.ones(3)
    for x in batches(getkey(), 5, (16, 3, 2)):
        y, state = apply(bn, x, state)
        xs = np.asarray(x, F64)
        mu, v = xs.mean((0, 2)), xs.var((0, 2))
        m, s2 = 0.5 * (mu + r_mean), 0.5 * (v + r_var)
        y_ref = (xs - m[None, :, None]) / np.sqrt(s2 + 1e-5)[None, :, None]
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        r_mean, r_var = 0.5 * r_mean + 0.5 * mu, 0.5 * r_var + 0.5 * v
        np.testing.assert_allclose(bn.statistics(state)[0], r_mean, rtol=1e-5)


class _Inflated(eqx_norm.Approach):
    """Stores plain batch statistics, starts from variance 4, and infers with the
    stored variance doubled: both hooks overridden."""

    def init(self, input_size, dtype):
        zeros = jnp.zeros((input_size,), dtype)
        return eqx_norm.RunningStats(zeros, zeros + 4, jnp.array(0, jnp.int32))

    def train(self, batch, running, momentum, eps):
        new = eqx_norm.RunningStats(batch.mean, batch.var, running.counter + 1)
        return batch.mean, batch.var, new

    def infer(self, running, momentum):
        return running.mean, 2 * running.var


def test_user_strategy_init_and_infer_are_used(getkey):
    bn, state = make(3, approach=_Inflated())
    np.testing.assert_array_equal(bn.statistics(state)[1], np.full(3, 8.0))
    x = batches(getkey(), 1, (16, 3, 2))[0]
    _, state = apply(bn, x, state)
    y, _ = apply(bn, x, state, inference=True)
    xs = np.asarray(x, F64)
    mu, v = xs.mean((0, 2)), xs.var((0, 2))
    y_ref = (xs - mu[None, :, None]) / np.sqrt(2 * v + 1e-5)[None, :, None]
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


def test_strategies_are_abstract_until_they_say_everything():
    """`AbstractApproach` declares what the layer calls; a strategy that does not
    implement it, or does not say whether it needs a batch variance, cannot be made.
    `Approach`, the class users subclass, needs only `train`."""

    class NoVariance(eqx_norm.AbstractApproach):
        def init(self, input_size, dtype):
            return eqx_norm.Batch().init(input_size, dtype)

        def train(self, batch, running, momentum, eps):
            return batch.mean, batch.var, running

        def infer(self, running, momentum):
            return running.mean, running.var

        def with_statistics(self, running, mean, var, counter):
            return running

    with pytest.raises(TypeError, match="needs_batch_variance"):
        NoVariance()

    class NoTrain(eqx_norm.Approach):
        pass

    with pytest.raises(TypeError, match="train"):
        NoTrain()  # pyright: ignore[reportAbstractUsage]
    for name, cls in eqx_norm.APPROACHES.items():
        assert isinstance(cls(), eqx_norm.AbstractApproach), name
        assert isinstance(cls.needs_batch_variance, bool), name
