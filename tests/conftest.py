import os

# Eight CPU devices stand in for eight accelerators; set before JAX starts. The
# tests check arithmetic, not speed: LLVM's optimisation of XLA:CPU's kernels (which
# uses no fast-math, so gives the same values) is skipped, a quarter of the suite's
# time, most of which is compiling.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true",
)

import jax
import pytest

if jax.default_backend() != "cpu":
    # GPUs run float32 matrix products and convolutions in TF32 by default (about
    # 1e-3 relative), which the float32 tolerances of these tests do not allow for:
    # they check the arithmetic, so they ask for full float32 products.
    jax.config.update("jax_default_matmul_precision", "highest")
    os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"  # and in subprocesses


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


def pytest_collection_modifyitems(items):
    # The notebook (run by nbmake) is an end-to-end run of the experiment: it
    # belongs to the slow tier with the other end-to-end commands.
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.slow)
