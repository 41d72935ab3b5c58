"""Data parallelism over every device of every process (host), and moving values in and out.

One process with one device is the common case, and then every function here is a plain
``jax.device_put`` / ``jax.device_get``. With ``--distributed``, every process runs the same
program on the same (seeded) data: :func:`shard_batch` gives each process's devices their
rows of each global batch, :func:`replicate` copies the state to every device, and
:func:`to_host` brings values back in every process. See "Several hosts" in the README.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def init_distributed(config) -> None:
    """With ``--distributed``, joins the other processes; must run before JAX uses a device.

    Does nothing without ``--distributed`` or when already initialized. Unset
    ``--coordinator`` / ``--num-processes`` / ``--process-id`` are left to
    ``jax.distributed.initialize`` to detect.
    """
    if not config.distributed or jax.distributed.is_initialized():
        return
    # Collectives between CPU processes need an implementation (Gloo; the default in recent
    # jax, but not in older ones). Only the CPU backend reads this option; a choice the user
    # made (e.g. "mpi") is kept.
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=config.coordinator,
        num_processes=config.num_processes,
        process_id=config.process_id,
    )


def data_parallel(batch_size: int, name: str = "--batch-size"):
    """Shardings for data parallelism over all devices of all processes (a no-op with one).

    Returns ``(replicated, sharded)``: for the state, and for batches split along their
    first axis. ``batch_size`` is the global batch, summed over every device of every process.
    """
    devices = jax.devices()
    if batch_size % len(devices):
        raise ValueError(
            f"{name} {batch_size} (the global batch) must be a multiple of the number of "
            f"devices, {len(devices)} ({jax.process_count()} process(es))"
        )
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    return NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def shard_batch(arrays: tuple[np.ndarray, ...], sharding: NamedSharding) -> tuple:
    """A global batch (the same NumPy arrays in every process) as device arrays split over
    all devices; each process transfers only the rows its own devices hold."""
    if jax.process_count() == 1:
        return jax.device_put(arrays, sharding)
    rows = _process_rows(sharding, len(arrays[0]))
    return tuple(jax.make_array_from_process_local_data(sharding, a[rows], a.shape) for a in arrays)


def _process_rows(sharding: NamedSharding, n: int) -> np.ndarray:
    """Indices of the rows of an ``n``-row batch that this process's devices hold, in the
    order ``jax.make_array_from_process_local_data`` expects them."""
    slices = {idx[0].indices(n) for idx in sharding.addressable_devices_indices_map((n,)).values()}
    return np.concatenate([np.arange(*s) for s in sorted(slices)])


def replicate(tree, sharding: NamedSharding):
    """Host (or single-device) values, the same in every process, copied to every device."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        # device_put onto devices of other processes takes NumPy (and checks that every
        # process passed the same value); random keys go as their raw data.
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jax.device_put(np.asarray(jax.random.key_data(x)), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.device_put(np.asarray(x), sharding)

    return jax.tree.map(put, tree)


def to_host(tree):
    """Device values as local values, in every process (a gather where not replicated)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def get(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return jax.device_get(x)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(
                get(jax.random.key_data(x)), impl=jax.random.key_impl(x)
            )
        if x.is_fully_replicated:
            return np.asarray(x)
        return multihost_utils.process_allgather(x, tiled=True)

    return jax.tree.map(get, tree)


def snapshot(tree):
    """A copy of device values that later donated steps cannot overwrite: on the host with
    one process; with several, a copy on the devices."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return jax.tree.map(jnp.copy, tree)


def restore(tree, replicated: NamedSharding):
    """A :func:`snapshot` back on the devices."""
    return jax.device_put(tree, replicated) if jax.process_count() == 1 else tree
