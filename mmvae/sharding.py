"""Devices and processes: ``jax.distributed`` set-up, the data mesh, state and batch shardings.

One 1-D :class:`jax.sharding.Mesh` over every device of every process, axis ``data``:
batches are split along it; parameters, optimiser state and EMA are replicated, or with
FSDP the large ones are split along it (:func:`state_shardings`). Used by the training
loop; nothing here knows about models or data.
"""
from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mmvae.errors import ConfigError

log = logging.getLogger(__name__)


def maybe_initialize_distributed(config) -> bool:
    """Call ``jax.distributed.initialize`` when the config or environment asks for it.

    ``distributed.initialize``: ``yes`` always, ``no`` never, ``auto`` when a
    coordinator address / process count is given (config or ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) or a multi-task SLURM / Open MPI job is
    detected. Must run before anything touches a JAX device. Returns True if this call
    initialised it.
    """
    d = config.distributed
    mode = d.initialize
    if mode == "no" or _distributed_initialized():
        return False
    addr = d.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    nproc = int(d.num_processes) or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
    pid = int(d.process_id) if int(d.process_id) >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1") or -1)
    cluster = (int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1
               or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1)
    if mode == "auto" and not (addr or nproc > 1 or cluster):
        return False
    kwargs = {}
    if addr:
        kwargs["coordinator_address"] = addr
    if nproc > 0:
        kwargs["num_processes"] = nproc
    if pid >= 0:
        kwargs["process_id"] = pid
    log.info("jax.distributed.initialize(%s)", kwargs)
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"jax.distributed.initialize({kwargs}) failed: {e}") from e
    return True


def _distributed_initialized() -> bool:
    try:
        return bool(jax.distributed.is_initialized())
    except AttributeError:   # older jax
        from jax._src import distributed
        return distributed.global_state.client is not None


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def data_mesh() -> jax.sharding.Mesh:
    """1-D mesh over every device (all processes), axis name ``data``."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def fsdp_spec(shape: tuple[int, ...], n: int, min_size: int) -> P:
    """PartitionSpec of one array under FSDP: its largest axis divisible by ``n`` along
    ``data`` if it has ≥ ``min_size`` elements, else replicated."""
    size = int(np.prod(shape)) if shape else 1
    if n <= 1 or not shape or size < min_size:
        return P()
    dims = [i for i, s in enumerate(shape) if s % n == 0 and s >= n]
    if not dims:
        return P()
    d = max(dims, key=lambda i: (shape[i], -i))
    return P(*[("data" if i == d else None) for i in range(len(shape))])


def state_shardings(state, mesh, *, fsdp: bool = False, min_size: int = 2 ** 18):
    """A tree of NamedShardings matching ``state``: replicated, or FSDP (see :func:`fsdp_spec`).

    Optimiser moments and EMA have the parameters' shapes and so get the same layout.
    """
    n = mesh.shape["data"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), n, min_size) if fsdp else P()),
                        state)


def place(tree, shardings):
    """Put host-identical values (same on every process) onto global ``shardings``."""
    host = jax.device_get(tree)
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx, x=x: np.asarray(x)[idx]),
        host, shardings)


def gather(tree):
    """Full host (numpy) copy of a possibly sharded tree, on every process."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        if isinstance(x, jax.Array) and not x.is_fully_replicated:
            x = jax.device_put(x, NamedSharding(x.sharding.mesh, P())) if hasattr(x.sharding, "mesh") else x
        return np.asarray(x)
    return jax.tree.map(one, tree)


def local_rows(mesh, global_batch: int) -> slice:
    """The contiguous rows of a ``global_batch`` sharded along ``data`` that this
    process's devices hold (all rows with one process)."""
    sharding = NamedSharding(mesh, P("data"))
    spans = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop)
                    for s in sharding.addressable_devices_indices_map((global_batch,)).values()})
    lo, hi = spans[0][0], spans[-1][1]
    if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        raise ConfigError(f"this process's devices hold non-contiguous batch rows {spans}")
    return slice(lo, hi)


def shard_batch(batch: dict, mesh, global_batch: int | None = None) -> dict:
    """Global arrays, sharded along ``data``, from this process's rows of the batch.

    With one process ``batch`` is the whole batch; with several it must hold exactly the
    rows :func:`local_rows` names (each process assembles only its own rows).
    """
    sharding = NamedSharding(mesh, P("data"))

    def one(x):
        gshape = ((global_batch if global_batch is not None else x.shape[0] * jax.process_count()),) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, np.asarray(x), gshape)

    return jax.tree.map(one, batch)
