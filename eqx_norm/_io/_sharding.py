import hashlib
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree

from .._checks import boolean


def shard_batch(
    batch: PyTree,
    mesh: Mesh,
    axis: str | tuple[str, ...] = "data",
    *,
    process_local: bool = False,
) -> PyTree:
    """Place a batch on a mesh, split along its leading axis over `axis`, for
    training under `jax.jit` on several devices (XLA's SPMD partitioner then inserts
    the collectives: BatchNorm statistics and gradients are those of the global
    batch).

    ```python
    mesh = jax.make_mesh(
        (jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
    )
    x, y = eqx_norm.shard_batch((x, y), mesh)
    model, state = eqx_norm.replicate((model, state), mesh)
    ```

    On several hosts (after `jax.distributed.initialize()`), call it on every
    process. By default each process passes the whole global batch (the same
    rows everywhere); with `process_local=True` each process passes only its own
    rows, and the result is the same global array: with `P` processes and a mesh
    from `jax.make_mesh`, process `i` (`jax.process_index()`) passes rows
    `i * n / P` to `(i + 1) * n / P` of the global batch of `n`. The processes
    then compare their batches' shapes and dtypes in one small all-gather, so
    that a process with other rows (an uneven last batch) is an error on every
    process rather than a hang. On one process, `process_local=True` is the
    global form.

    **Arguments:**

    - `batch`: a pytree of arrays with a common leading batch axis: the global
        batch, or with `process_local=True` this process's rows of it.
    - `mesh`: the device mesh.
    - `axis`: the mesh axis (or axes) to split the batch over.
    - `process_local`: whether `batch` holds only this process's rows.

    **Returns:**

    The global batch, placed on the mesh.

    **Raises:**

    A `ValueError` naming the sizes if the batch does not divide evenly over the
    devices (with `process_local=True`: if a process's rows do not divide over
    its own devices, raised on every process), or if the processes pass batches
    of different shapes or dtypes (raised on every process).
    """
    _check_mesh("shard_batch", mesh)
    process_local = boolean("process_local", process_local)
    if not (
        isinstance(axis, str)
        or (isinstance(axis, tuple) and axis and all(isinstance(a, str) for a in axis))
    ):
        raise TypeError(
            f"`shard_batch`: `axis` must be a mesh axis name or a tuple of them, got "
            f"{axis!r}; e.g. `axis='data'` for a mesh of axes {tuple(mesh.shape)}."
        )
    names: tuple[str, ...] = (axis,) if isinstance(axis, str) else tuple(axis)
    devices = 1
    for name in names:
        if name not in mesh.shape:
            raise ValueError(
                f"`shard_batch(axis={axis!r})`: the mesh has axes {tuple(mesh.shape)}."
            )
        devices *= mesh.shape[name]
    for x in jax.tree.leaves(batch):
        if not hasattr(x, "shape") or not hasattr(x, "dtype") or np.ndim(x) == 0:
            raise ValueError(
                "`shard_batch`: every leaf of `batch` must be an array with a leading "
                f"batch axis; got {x!r:.60}. Pass scalars and other settings to the "
                "step separately, or as arrays of one row per example."
            )
    leaves = jax.tree.leaves(batch)
    sizes = sorted({np.shape(x)[0] for x in leaves})
    if len(sizes) > 1:
        raise ValueError(
            f"`shard_batch`: the arrays of `batch` have different leading sizes "
            f"{sizes}; each must hold one row per example, so that every device "
            "gets the same examples of each."
        )
    if process_local and sizes == [0]:
        raise ValueError(
            f"`shard_batch(..., process_local=True)`: process "
            f"{jax.process_index()} passes 0 rows; give every process at least one "
            "row per device (drop an empty last batch)."
        )
    spec = PartitionSpec(names[0] if len(names) == 1 else names)
    sharding = NamedSharding(mesh, spec)
    if process_local and not _all_local(mesh):
        return _from_process_local(batch, sharding, devices, axis)

    def place(x: Any):
        size = x.shape[0]
        if size % devices:
            raise ValueError(
                f"A global batch of {size} does not split evenly over {devices} "
                f"devices (mesh axis {axis!r}); use a batch size that is a multiple "
                f"of {devices}, e.g. {(size // devices + 1) * devices}."
            )
        if isinstance(x, jax.core.Tracer):  # pyright: ignore[reportAttributeAccessIssue]
            # Inside `jit`: the same placement, as a constraint on the traced batch.
            return jax.lax.with_sharding_constraint(x, sharding)
        return jax.device_put(x, sharding)

    return jax.tree.map(place, batch)


def _check_mesh(tool: str, mesh: Any) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"`{tool}`: `mesh` must be a `jax.sharding.Mesh`, got "
            f"{type(mesh).__name__}; make one with `jax.make_mesh(("
            "jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType."
            "Auto,))`."
        )


def _all_local(mesh: Mesh) -> bool:
    """Whether every device of the mesh belongs to this process."""
    here = jax.process_index()
    return all(d.process_index == here for d in mesh.devices.flat)


def _from_process_local(
    batch: PyTree, sharding: NamedSharding, devices: int, axis: Any
) -> PyTree:
    """The global batch from every process's rows, after checking on every process
    that the rows of all processes fit."""
    leaves, treedef = jax.tree.flatten(batch)
    # How many distinct row blocks this process's devices hold.
    blocks = sharding.addressable_devices_indices_map((devices,)).values()
    local = len({index[0].start for index in blocks if index is not None})
    rows = [np.shape(x)[0] if np.ndim(x) else 0 for x in leaves]
    bad = [r for r in rows if r == 0 or r % local]
    signature = repr((treedef, [(np.shape(x), _dtype(x)) for x in leaves])).encode()
    digest = np.frombuffer(hashlib.sha256(signature).digest()[:8], np.int32)
    mine = np.array([bad[0] if bad else rows[0] if rows else 0, not bad, *digest])
    every = multihost_utils.process_allgather(mine.astype(np.int32))
    if not every[:, 1].all():
        p = int(np.argmin(every[:, 1]))
        r = int(every[p, 0])
        raise ValueError(
            f"`shard_batch(..., process_local=True)`: process {p} passes {r} rows, "
            f"which do not split over its {local} devices on mesh axis {axis!r}; "
            f"give every process a multiple of {local} rows (a global batch that "
            f"is a multiple of {devices}), e.g. {(r // local + 1) * local} rows "
            "each."
        )
    if (every[:, [0, 2, 3]] != every[0, [0, 2, 3]]).any():
        shapes = ", ".join(f"{_dtype(x)}{list(np.shape(x))}" for x in leaves)
        raise ValueError(
            "`shard_batch(..., process_local=True)`: the processes pass batches "
            f"of different shapes or dtypes (rows per process: "
            f"{every[:, 0].tolist()}; process {jax.process_index()} passes "
            f"{shapes}). Every process must pass the same number of rows with the "
            "same shapes and dtypes: drop (or pad) an uneven last batch on every "
            "process alike."
        )
    out = [
        jax.make_array_from_process_local_data(
            sharding, x, (np.shape(x)[0] // local * devices, *np.shape(x)[1:])
        )
        for x in leaves
    ]
    return jax.tree.unflatten(treedef, out)


def _dtype(x: Any) -> str:
    return np.dtype(x.dtype if hasattr(x, "dtype") else np.result_type(x)).name


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Place every array of a pytree (a model, a state, an optimizer state) on every
    device of the mesh.

    ```python
    mesh = jax.make_mesh(
        (jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
    )
    model, state, opt_state = eqx_norm.replicate((model, state, opt_state), mesh)
    ```

    **Arguments:**

    - `tree`: any pytree.
    - `mesh`: the device mesh.

    **Returns:**

    The pytree with its arrays replicated over the mesh.
    """
    _check_mesh("replicate", mesh)
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(
        lambda x: jax.device_put(x, sharding) if isinstance(x, jax.Array) else x, tree
    )
