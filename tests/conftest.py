import jax
import pytest


@pytest.fixture(autouse=True)
def _strict_dtype_promotion():
    # A context manager, so the global setting is restored after each test.
    with jax.numpy_dtype_promotion("strict"):
        yield


@pytest.fixture
def getkey():
    keys = iter(jax.random.split(jax.random.key(5678), 1000))
    return lambda: next(keys)
