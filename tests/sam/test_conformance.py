"""One conformance suite for every SAM-family optimizer: `sam`, ASAM, `looksam`,
`msam` and the user-written variant of `eqx_norm.perturbed_gradient`'s docstring,
through every mode of `sam_step`, each against what it must reduce to and inside
each Optax wrapper against itself unwrapped.

What every member must do:

- reduce to its base optimizer at `rho=0` (the gradient at the unperturbed point);
- `looksam(every=1)` is SAM: the perturbed gradient is recomputed every step;
- leave the model's BatchNorm statistics as one plain step of the base optimizer
  leaves them (statistics from the first pass, at the unperturbed point); `msam`'s
  one pass is at its perturbed point, so its statistics are that point's (its
  docstring says so) and it is left out of this one;
- give the same steps inside `optax.chain`, `optax.inject_hyperparams`,
  `optax.apply_if_finite`, `optax.MultiSteps(every_k_schedule=1)` and
  `optax.masked` (every leaf trained) as unwrapped.

Two steps each, so that what a member carries from one step to the next (msam's
momentum, looksam's stored direction) is exercised. The default tier runs every
member in every mode unwrapped and each wrapper once; the slow tier runs every
member inside every wrapper in every mode, and every reduction in every mode.
"""

import functools
import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest

import eqx_norm

from ..helpers import (
    Net,
    assert_close,
    assert_same,
    clone,
    docs_variant,
    mse_loss,
    regression_data,
)

LR, RHO = 0.1, 0.05


def _asam(base, rho):
    return eqx_norm.sam(base, rho=rho, adaptive=True)


def _looksam(base, rho):
    return eqx_norm.looksam(base, rho=rho, every=1)


# Each member as `make(base, rho)`. msam needs a base with momentum (it perturbs
# along the last step), so every member runs around SGD with momentum.
MEMBERS = {
    "sam": eqx_norm.sam,
    "asam": _asam,
    "looksam": _looksam,
    "msam": eqx_norm.msam,
    "signed_sam": docs_variant(),
}

MODES = {
    "whole-batch": {},
    "micro-batches": {"micro_batches": 2},
    "per-micro-batch": {"micro_batches": 2, "perturbation": "per-micro-batch"},
}


def _injected(make):
    # The member's own function with its hyperparameters injected (rho becomes a
    # state entry); the base optimizer, its first argument, is static.
    base = next(iter(inspect.signature(make).parameters))
    return lambda b, rho: optax.inject_hyperparams(make, static_args=base)(b, rho=rho)


WRAPPERS = {
    "chain": lambda make: lambda b, r: optax.chain(optax.identity(), make(b, r)),
    "inject_hyperparams": _injected,
    "apply_if_finite": lambda make: (
        lambda b, r: optax.apply_if_finite(make(b, r), max_consecutive_errors=3)
    ),
    "MultiSteps": lambda make: (
        lambda b, r: optax.MultiSteps(make(b, r), every_k_schedule=1)
    ),
    "masked": lambda make: (
        lambda b, r: optax.masked(make(b, r), lambda p: jax.tree.map(lambda _: True, p))
    ),
}


def _base():
    return optax.sgd(LR, momentum=0.9)


@functools.cache
def _problem():
    model, state = eqx.nn.make_with_state(Net)(jax.random.key(0))
    batches = [regression_data(k) for k in jax.random.split(jax.random.key(1), 2)]
    return model, state, batches


def _two_steps(opt, mode: str):
    """The parameters after two jitted steps of `sam_step(mse_loss, opt)` in
    `mode` from the same model and batches, and the BatchNorm state and the loss
    after each step."""
    model, state, batches = _problem()
    state = clone(state)
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    step = eqx.filter_jit(eqx_norm.sam_step(mse_loss, opt, **MODES[mode]))
    states, losses = [], []
    for x, y in batches:
        model, state, opt_state, loss = step(model, state, opt_state, x, y)
        states.append(clone(state))
        losses.append(loss)
    return eqx.filter(model, eqx.is_inexact_array), states, losses


@functools.cache
def _unwrapped(member: str, mode: str, rho: float = RHO):
    return _two_steps(MEMBERS[member](_base(), rho), mode)


@functools.cache
def _plain(mode: str):
    return _two_steps(_base(), mode)


def _supported(member: str, mode: str) -> bool:
    # msam makes one pass, at the point its last step declares: there is no first
    # pass whose gradient could be split per micro-batch.
    return not (member == "msam" and mode == "per-micro-batch")


PAIRS = [(m, mode) for m in MEMBERS for mode in MODES if _supported(m, mode)]
CASES = [pytest.param(member, mode, id=f"{member}-{mode}") for member, mode in PAIRS]


@pytest.mark.standard_promotion  # optax.sgd's momentum mixes a Python float
@pytest.mark.parametrize(
    "member, mode",
    [
        # Each member once in the default tier, in every mode in the slow tier.
        pytest.param(
            member,
            mode,
            id=f"{member}-{mode}",
            marks=() if mode == "whole-batch" else pytest.mark.slow,
        )
        for member, mode in PAIRS
    ],
)
def test_at_rho_zero_a_member_is_its_base(member, mode):
    params, _, losses = _unwrapped(member, mode, rho=0.0)
    plain_params, _, plain_losses = _plain(mode)
    assert_close(params, plain_params, rtol=1e-5, atol=1e-7)
    assert_close(losses, plain_losses, rtol=1e-6)


@pytest.mark.standard_promotion
@pytest.mark.parametrize("member, mode", CASES)
def test_a_member_moves_away_from_its_base(member, mode):
    # The reductions above would pass for a member that ignored rho: at rho > 0 the
    # second step's parameters differ from the base's.
    params, _, _ = _unwrapped(member, mode)
    plain_params, _, _ = _plain(mode)
    gap = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(plain_params))
    )
    assert gap > 1e-4, gap


@pytest.mark.standard_promotion
@pytest.mark.parametrize("mode", list(MODES))
def test_looksam_every_step_is_sam(mode):
    params, states, losses = _unwrapped("looksam", mode)
    sam_params, sam_states, sam_losses = _unwrapped("sam", mode)
    assert_close(params, sam_params, rtol=1e-5, atol=1e-7)
    assert_close(losses, sam_losses, rtol=1e-6)
    assert_close(states, sam_states, rtol=1e-6, atol=1e-7)


@pytest.mark.standard_promotion
@pytest.mark.parametrize(
    "member, mode",
    [pytest.param(*p, id="-".join(p)) for p in PAIRS if p[0] != "msam"],
)
def test_statistics_are_those_of_the_first_pass(member, mode):
    """The SAM/BatchNorm rule: the perturbed pass leaves the running statistics
    alone, so the first step leaves what a plain step of the base leaves. (After
    it the parameters differ, and so do the second batch's statistics.)"""
    _, states, _ = _unwrapped(member, mode)
    _, plain_states, _ = _plain(mode)
    assert_same(states[0], plain_states[0])


# Each wrapper once in the default tier, each time with another member and mode;
# every member, wrapper and mode in the slow tier.
DEFAULT_WRAPPED = {
    ("sam", "apply_if_finite", "per-micro-batch"),
    ("asam", "MultiSteps", "micro-batches"),
    ("looksam", "inject_hyperparams", "whole-batch"),
    ("msam", "chain", "micro-batches"),
    ("signed_sam", "masked", "per-micro-batch"),
}
WRAPPED = [
    pytest.param(
        member,
        wrapper,
        mode,
        id=f"{member}-{wrapper}-{mode}",
        marks=() if (member, wrapper, mode) in DEFAULT_WRAPPED else pytest.mark.slow,
    )
    for member in MEMBERS
    for wrapper in WRAPPERS
    for mode in MODES
    if _supported(member, mode)
]


@pytest.mark.standard_promotion
@pytest.mark.parametrize("member, wrapper, mode", WRAPPED)
def test_a_wrapped_member_steps_as_unwrapped(member, wrapper, mode):
    opt = WRAPPERS[wrapper](MEMBERS[member])(_base(), RHO)
    params, states, losses = _two_steps(opt, mode)
    expected_params, expected_states, expected_losses = _unwrapped(member, mode)
    assert_close(params, expected_params, rtol=1e-5, atol=1e-7)
    assert_close(losses, expected_losses, rtol=1e-6)
    assert_close(states, expected_states, rtol=1e-6, atol=1e-7)


def test_a_mode_a_member_cannot_take_is_refused_before_any_pass():
    # msam declares its one perturbation before the step: per-micro-batch
    # perturbation is refused, naming the option, with the state untouched.
    model, state, batches = _problem()
    state, before = clone(state), clone(state)  # the cached state stays unused
    opt = eqx_norm.msam(_base(), RHO)
    step = eqx_norm.sam_step(mse_loss, opt, **MODES["per-micro-batch"])
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    with pytest.raises(ValueError, match='perturbation="per-micro-batch"'):
        step(model, state, opt_state, *batches[0])
    assert_same(state, before)
