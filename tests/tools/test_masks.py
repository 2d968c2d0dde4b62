import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqx_norm

from ..helpers import (
    MLP,
    Net,
    assert_close,
    assert_same,
    clone,
    leaves,
    mse_loss,
    one_step,
    regression_data,
)


def _every_kind(key):
    keys = jax.random.split(key, 2)
    return eqx.nn.Sequential(
        [
            eqx.nn.Linear(4, 6, key=keys[0]),
            eqx_norm.BatchNorm(6, "batch"),
            eqx_norm.BatchNorm(6, "batch", channelwise_affine=False),
            eqx.nn.BatchNorm(6, "batch", mode="batch"),
            eqx.nn.LayerNorm(6, use_weight=False),
            eqx.nn.GroupNorm(2, 6),
            eqx.nn.GroupNorm(3, 6, channelwise_affine=False),
            eqx.nn.RMSNorm(6, use_bias=True),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Linear(6, 2, key=keys[1]),
        ]
    )


def test_marks_weight_and_bias_of_every_normalisation_layer(getkey):
    model, _ = eqx.nn.make_with_state(_every_kind)(getkey())
    params = eqx.filter(model, eqx.is_inexact_array)
    mask = eqx_norm.normalisation_mask(params)
    # Same structure as the parameters, None leaves included.
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    marked = {
        jax.tree_util.keystr(path): m
        for path, m in jax.tree_util.tree_leaves_with_path(mask)
    }
    assert marked == {
        ".layers[0].weight": False,
        ".layers[0].bias": False,
        ".layers[1].weight": True,
        ".layers[1].bias": True,
        ".layers[3].weight": True,
        ".layers[3].bias": True,
        ".layers[4].bias": True,  # LayerNorm(use_weight=False): no weight
        ".layers[5].weight": True,
        ".layers[5].bias": True,
        ".layers[7].weight": True,
        ".layers[7].bias": True,
        ".layers[9].weight": False,
        ".layers[9].bias": False,
    }
    # The whole model (not filtered) gives the same marks on its arrays.
    whole = eqx_norm.normalisation_mask(model)
    assert [m for m in jax.tree.leaves(whole) if m] == [True] * 9


def test_none_leaves_and_plain_containers(getkey):
    bn = eqx_norm.BatchNorm(3, "batch")
    params = {"norm": eqx.filter(bn, eqx.is_inexact_array), "w": jnp.ones(2), "x": None}
    mask = eqx_norm.normalisation_mask(params)
    assert mask["x"] is None and mask["w"] is False
    assert mask["norm"].weight is True and mask["norm"].bias is True


@pytest.mark.parametrize(
    "model",
    [
        lambda k: eqx.nn.MLP(4, 2, 8, 2, key=k),
        lambda k: eqx.nn.Sequential(
            [
                eqx.nn.Linear(4, 6, key=k),
                eqx_norm.BatchNorm(6, "batch", channelwise_affine=False),
                eqx.nn.LayerNorm(6, use_weight=False, use_bias=False),
                eqx.nn.RMSNorm(6, use_weight=False, use_bias=False),
            ]
        ),
    ],
    ids=["no normalisation layer", "no affine parameters"],
)
def test_nothing_to_perturb_is_refused(model, getkey):
    params = eqx.filter(model(getkey()), eqx.is_inexact_array)
    with pytest.raises(ValueError, match="found no normalisation layer with a weight"):
        eqx_norm.normalisation_mask(params)
    opt = eqx_norm.sam(optax.sgd(0.1), mask=eqx_norm.normalisation_mask)
    with pytest.raises(ValueError, match="SAM-ON would perturb nothing"):
        opt.update(params, opt.init(params), params, grad_fn=lambda p: p)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_on_against_the_formula(adaptive, getkey):
    """One SAM-ON step through `sam_step`: the perturbation lives on the BatchNorm
    weights and biases only and its norm is theirs only, against the formula
    written out in float64."""
    rho, lr, eta = 0.3, 0.1, 0.01
    model, state = eqx.nn.make_with_state(MLP)(key=getkey())
    params, static = eqx.partition(model, eqx.is_inexact_array)
    x, y = regression_data(getkey())
    opt = eqx_norm.sam(
        optax.sgd(lr),
        rho=rho,
        adaptive=adaptive,
        eta=eta,
        mask=eqx_norm.normalisation_mask,
    )
    new_model, _, _, _ = eqx.filter_jit(eqx_norm.sam_step(mse_loss, opt))(
        model, clone(state), opt.init(params), x, y
    )

    def loss_at(p):
        return mse_loss(eqx.combine(p, static), clone(state), x, y)[0]

    grad = jax.jit(jax.grad(loss_at))
    to64 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)  # noqa: E731
    w, g = to64(params), to64(grad(params))
    on = jax.tree.leaves(eqx_norm.normalisation_mask(params))
    t = [np.abs(a) + eta if adaptive else np.ones_like(a) for a in jax.tree.leaves(w)]
    tg = [ti * gi * m for ti, gi, m in zip(t, jax.tree.leaves(g), on)]
    norm = np.sqrt(sum(np.sum(a**2) for a in tg))
    e = [rho * ti * a / norm for ti, a in zip(t, tg)]
    assert sum(a.size for a, m in zip(e, on) if m) == 22  # 2 x (6 + 5)
    point = jax.tree.unflatten(
        jax.tree.structure(params),
        [(wi + ei).astype(np.float32) for wi, ei in zip(jax.tree.leaves(w), e)],
    )
    g2 = to64(grad(point))
    expected = jax.tree.map(lambda w, g: w - lr * g, w, g2)
    for a, b in zip(
        jax.tree.leaves(eqx.filter(new_model, eqx.is_inexact_array)),
        jax.tree.leaves(expected),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


_slow = pytest.mark.slow  # each compiles three steps


@pytest.mark.parametrize(
    "make, step_options",
    [
        pytest.param(
            lambda mask: eqx_norm.sam(optax.sgd(0.1), rho=0.3, mask=mask), {}, id="sam"
        ),
        pytest.param(
            lambda mask: optax.chain(
                optax.clip_by_global_norm(1.0),
                eqx_norm.sam(optax.sgd(0.1), rho=2.0, adaptive=True, mask=mask),
            ),
            {},
            id="asam in chain",
            marks=_slow,
        ),
        pytest.param(
            lambda mask: eqx_norm.looksam(optax.sgd(0.1), rho=0.3, every=2, mask=mask),
            {},
            id="looksam",
            marks=_slow,
        ),
        pytest.param(
            lambda mask: eqx_norm.sam(optax.sgd(0.1), rho=0.3, mask=mask),
            {"micro_batches": 2},
            id="micro-batches",
            marks=_slow,
        ),
        pytest.param(
            lambda mask: eqx_norm.sam(optax.sgd(0.1), rho=0.3, mask=mask),
            {"micro_batches": 2, "perturbation": "per-micro-batch"},
            id="per-micro-batch",
            marks=_slow,
        ),
        # A callable hyperparameter is a schedule to `inject_hyperparams`, so a mask
        # is named static.
        pytest.param(
            lambda mask: optax.inject_hyperparams(eqx_norm.sam, static_args="mask")(
                base_optimizer=optax.sgd(0.1), rho=0.3, mask=mask
            ),
            {},
            id="injected",
            marks=_slow,
        ),
    ],
)
def test_the_callable_equals_the_mask_it_makes(make, step_options, getkey):
    """Passed as a callable, the mask acts as the tree it returns, with every
    member of the SAM family and every option of the step; and it differs from
    perturbing everything."""
    model, state = eqx.nn.make_with_state(MLP)(key=getkey())
    params = eqx.filter(model, eqx.is_inexact_array)
    x, y = regression_data(getkey())
    outs = []
    for mask in (
        eqx_norm.normalisation_mask,
        eqx_norm.normalisation_mask(params),
        None,
    ):
        opt = make(mask)
        step = eqx.filter_jit(eqx_norm.sam_step(mse_loss, opt, **step_options))
        trio = (model, clone(state), opt.init(params))
        for _ in range(2):
            *trio, _ = step(*trio, x, y)
        outs.append(jax.tree.leaves(eqx.filter(trio[0], eqx.is_inexact_array)))
    for a, b in zip(outs[0], outs[1]):
        np.testing.assert_array_equal(a, b)
    assert any(not np.allclose(a, b) for a, b in zip(outs[0], outs[2]))


def test_a_mask_that_is_an_equinox_module_is_a_tree_not_a_function(getkey):
    """Regression: a mask made from a filtered model is an Equinox module, which is
    callable; it was called on the parameters (`MLP.__call__() missing ... 'state'`)
    instead of being read as the tree of bools it is."""
    model, _ = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [eqx.nn.Linear(3, 4, key=getkey()), eqx_norm.BatchNorm(4, "batch")]
    )
    params = eqx.filter(model, eqx.is_inexact_array)
    mask = eqx_norm.normalisation_mask(params)
    assert callable(mask)
    opt = eqx_norm.sam(optax.sgd(0.1), rho=0.5, mask=mask)
    points = []

    def grad_fn(p):
        points.append(p)
        return jax.tree.map(jnp.ones_like, p)

    grads = jax.tree.map(jnp.ones_like, params)
    opt.update(grads, opt.init(params), params, grad_fn=grad_fn)
    (point,) = points
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), point, params)
    assert jax.tree.leaves(moved) == [False, False, True, True]


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "what",
    [
        None,
        jnp.ones(3),
        "model",
        {},
        eqx.nn.make_with_state(MLP)()[1],
    ],
    ids=["none", "an-array", "a-string", "an-empty-dict", "the-model-state"],
)
def test_normalisation_mask_of_what_holds_no_parameters(what):
    """What an unlucky user passes instead of the parameters is refused as holding
    no normalisation layer, naming the layers it knows and the alternative."""
    before = leaves(what)
    with pytest.raises(
        ValueError,
        match=r"`eqx_norm\.normalisation_mask` found no normalisation layer with a "
        r"weight or bias.*use `mask=None`",
    ):
        eqx_norm.normalisation_mask(what)
    assert_same(what, before)


_SAM_ON_FAMILY = {
    "sam-on-per-micro-batch": (
        lambda: eqx_norm.sam(optax.sgd(0.1), rho=0.3, mask=eqx_norm.normalisation_mask),
        {"micro_batches": 2, "perturbation": "per-micro-batch"},
    ),
    "asam-on-in-chain": (
        lambda: optax.chain(
            optax.clip_by_global_norm(1.0),
            eqx_norm.sam(
                optax.sgd(0.1), rho=2.0, adaptive=True, mask=eqx_norm.normalisation_mask
            ),
        ),
        {},
    ),
    "looksam-on": (
        lambda: eqx_norm.looksam(
            optax.sgd(0.1), rho=0.3, every=2, mask=eqx_norm.normalisation_mask
        ),
        {},
    ),
    "injected-sam-on": (
        lambda: optax.inject_hyperparams(eqx_norm.sam, static_args="mask")(
            base_optimizer=optax.sgd(0.1), rho=0.3, mask=eqx_norm.normalisation_mask
        ),
        {},
    ),
    "sam-on-in-apply-if-finite": (
        lambda: optax.apply_if_finite(
            eqx_norm.sam(optax.sgd(0.1), mask=eqx_norm.normalisation_mask), 3
        ),
        {},
    ),
    "sam-on-in-multi-steps": (
        lambda: optax.MultiSteps(
            eqx_norm.sam(optax.sgd(0.1), mask=eqx_norm.normalisation_mask), 1
        ),
        {},
    ),
}


@pytest.mark.standard_promotion  # optax.MultiSteps and inject_hyperparams
@pytest.mark.parametrize("member", list(_SAM_ON_FAMILY))
def test_sam_on_of_a_model_without_normalisation_layers_is_refused(member, getkey):
    """Every member of the family with `mask=eqx_norm.normalisation_mask`, inside
    every wrapper and with every option of the step, refuses a model without
    normalisation layers when the step is traced, before the second pass it would
    waste; the model, state and optimizer state are unchanged."""
    make, options = _SAM_ON_FAMILY[member]
    model, state = eqx.nn.make_with_state(Net)(getkey(), norm=False)
    opt = make()
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    before = leaves((model, state, opt_state))
    step = eqx.filter_jit(eqx_norm.sam_step(mse_loss, opt, **options))
    with pytest.raises(ValueError, match="found no normalisation.*perturb nothing"):
        step(model, state, opt_state, *regression_data(getkey()))
    assert_same((model, state, opt_state), before)


def _other_models_mask(params):
    net = Net(jax.random.key(0))
    return eqx_norm.normalisation_mask(eqx.filter(net, eqx.is_inexact_array))


@pytest.mark.parametrize(
    "mask, error, message",
    [
        (_other_models_mask, ValueError, r"`mask`.*structure of the parameters"),
        (lambda p: lambda params: [True], ValueError, r"`mask`.*structure"),
        (
            lambda p: jax.tree.map(lambda _: "train", p),
            TypeError,
            r"`mask`.*(bool|True or False)",
        ),
        (lambda p: "normalisation", TypeError, r"`mask`"),
    ],
    ids=[
        "another-models-mask",
        "a-function-returning-another-structure",
        "multi-transform-labels",
        "a-string",
    ],
)
def test_a_mask_that_does_not_fit_the_parameters_names_mask(
    mask, error, message, getkey
):
    model, state = eqx.nn.make_with_state(MLP)(key=getkey())
    params = eqx.filter(model, eqx.is_inexact_array)
    before = leaves((model, state))
    with pytest.raises(error, match=message):
        opt = eqx_norm.sam(optax.sgd(0.1), rho=0.3, mask=mask(params))
        eqx.filter_jit(eqx_norm.sam_step(mse_loss, opt))(
            model, state, opt.init(params), *regression_data(getkey())
        )
    assert_same((model, state), before)


def test_sam_on_under_inject_hyperparams_without_a_static_mask_says_so(getkey):
    model, _ = eqx.nn.make_with_state(MLP)(key=getkey())
    params = eqx.filter(model, eqx.is_inexact_array)
    before = leaves(params)
    opt = optax.inject_hyperparams(eqx_norm.sam)(
        base_optimizer=optax.sgd(0.1), rho=0.3, mask=eqx_norm.normalisation_mask
    )
    with pytest.raises(ValueError, match=r'static_args="mask"'):
        opt.init(params)
    assert_same(params, before)


@pytest.mark.parametrize(
    "make",
    [
        lambda: eqx_norm.sam(optax.sgd(0.1), rho=0.3, mask=eqx_norm.normalisation_mask),
        lambda: eqx_norm.looksam(
            optax.sgd(0.1), rho=0.3, every=1, mask=eqx_norm.normalisation_mask
        ),
    ],
    ids=["sam-on", "looksam-on"],
)
def test_sam_on_inside_optax_masked_to_the_normalisation_layers(make, getkey):
    """SAM-ON inside `optax.masked(..., normalisation_mask(params))` (the base
    optimizer trains the normalisation layers only) updates them as SAM-ON does
    outside the wrapper."""
    model, state = eqx.nn.make_with_state(MLP)(key=getkey())
    mask = eqx_norm.normalisation_mask(eqx.filter(model, eqx.is_inexact_array))
    x, y = regression_data(getkey())
    inside, _, _ = one_step(optax.masked(make(), mask), model, state, x, y)
    alone, _, _ = one_step(make(), model, state, x, y)

    def chosen(tree):
        return [a for a, m in zip(jax.tree.leaves(tree), jax.tree.leaves(mask)) if m]

    assert_close(chosen(inside), chosen(alone), rtol=1e-6, atol=1e-7)
