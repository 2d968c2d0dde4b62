from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree


def shard_batch(
    batch: PyTree, mesh: Mesh, axis: str | tuple[str, ...] = "data"
) -> PyTree:
    """Place a batch on a mesh, split along its leading axis over `axis`, for
    training under `jax.jit` on several devices (XLA's SPMD partitioner then inserts
    the collectives: BatchNorm statistics and gradients are those of the global
    batch).

    ```python
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    x, y = eqx_norm.shard_batch((x, y), mesh)
    model, state = eqx_norm.replicate((model, state), mesh)
    ```

    **Arguments:**

    - `batch`: a pytree of arrays with a common leading batch axis.
    - `mesh`: the device mesh.
    - `axis`: the mesh axis (or axes) to split the batch over.

    **Returns:**

    The batch, placed on the mesh.

    **Raises:**

    A `ValueError` naming the sizes if the batch does not divide evenly.
    """
    names: tuple[str, ...] = (axis,) if isinstance(axis, str) else tuple(axis)
    devices = 1
    for name in names:
        if name not in mesh.shape:
            raise ValueError(
                f"`shard_batch(axis={axis!r})`: the mesh has axes {tuple(mesh.shape)}."
            )
        devices *= mesh.shape[name]
    spec = PartitionSpec(names[0] if len(names) == 1 else names)
    sharding = NamedSharding(mesh, spec)

    def place(x: Any):
        size = x.shape[0]
        if size % devices:
            raise ValueError(
                f"A global batch of {size} does not split evenly over {devices} "
                f"devices (mesh axis {axis!r}); use a batch size that is a multiple "
                f"of {devices}, e.g. {(size // devices + 1) * devices}."
            )
        return jax.device_put(x, sharding)

    return jax.tree.map(place, batch)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Place every array of a pytree (a model, a state, an optimizer state) on every
    device of the mesh.

    **Arguments:**

    - `tree`: any pytree.
    - `mesh`: the device mesh.

    **Returns:**

    The pytree with its arrays replicated over the mesh.
    """
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(
        lambda x: jax.device_put(x, sharding) if isinstance(x, jax.Array) else x, tree
    )
