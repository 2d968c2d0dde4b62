import os

# Eight CPU devices stand in for eight accelerators; set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "standard_promotion: run under JAX's standard dtype promotion, for tests "
        "that call third-party code that is not clean under strict promotion "
        "(optax.adam mixes a Python float with its int32 step count).",
    )


@pytest.fixture(autouse=True)
def _strict_dtype_promotion(request):
    # A context manager, so the global setting is restored after each test.
    mode = (
        "standard"
        if request.node.get_closest_marker("standard_promotion")
        else "strict"
    )
    with jax.numpy_dtype_promotion(mode):
        yield


@pytest.fixture
def getkey():
    keys = iter(jax.random.split(jax.random.key(5678), 1000))
    return lambda: next(keys)
