"""Device mesh, shardings and global batches.

Two axes, `data` x `model`. The batch is split over both (every device its own rows). A frozen
codebook is split along K over `model` (size 1 unless ``mesh.model`` asks for more): each device
holds K / model codes, and the nearest-code search and row lookups exchange rows and minima
within each `model` group (vqlc.neighbors), so a 1,000,000-code codebook never sits whole on one
device. Parameters and optimiser state are
replicated by default, or, with ``mesh.shard_params`` (FSDP / ZeRO-3 style), each large array is
split over the data axis along one of its dimensions: XLA gathers the weights where a layer
needs them and reduce-scatters their gradients, so per-device state memory falls with the
device count. The same code runs on one CPU, several virtual CPU devices (tests), a GPU node or
a TPU slice.
"""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vqlc.neighbors import CODEBOOK_AXIS

DATA_AXIS = "data"
MODEL_AXIS = CODEBOOK_AXIS


def make_mesh(num_data_devices: int = -1, devices=None, model: int = 1) -> Mesh:
    """A (data, model) mesh: `num_data_devices` (-1 = all that remain) x `model` devices."""
    devices = list(jax.devices() if devices is None else devices)
    if model < 1 or len(devices) < model:
        raise ValueError(f"mesh.model={model} must lie in [1, {len(devices)}] (the devices "
                         "available).")
    n = len(devices) // model if num_data_devices == -1 else num_data_devices
    if n < 1 or n * model > len(devices):
        raise ValueError(f"mesh.data={num_data_devices} x mesh.model={model} devices asked for, "
                         f"but {len(devices)} are available.")
    return Mesh(np.array(devices[:n * model]).reshape(n, model), (DATA_AXIS, MODEL_AXIS))


def codebook_sharding(mesh: Mesh) -> NamedSharding:
    """A codebook [K, ...] split along K over the model axis (replicated when it has size 1)."""
    return NamedSharding(mesh, P(MODEL_AXIS))


def check_codebook_split(codebook_size: int, mesh: Mesh) -> None:
    shards = mesh.shape[MODEL_AXIS]
    if codebook_size % shards:
        raise ValueError(f"quantizer.codebook_size={codebook_size} must be divisible by "
                         f"mesh.model={shards}, the ways the codebook is split.")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_sharding(mesh: Mesh, shape: tuple, min_size: int = 2 ** 14) -> NamedSharding:
    """FSDP placement of one array: split over the data axis along its largest dimension that
    the axis divides; arrays under `min_size` elements (biases, norms, scalars) stay replicated,
    where gathering them would cost more than it saves."""
    n = mesh.shape[DATA_AXIS]
    if n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return replicated(mesh)
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    for d in dims:
        if shape[d] % n == 0:
            spec = [None] * len(shape)
            spec[d] = DATA_AXIS
            return NamedSharding(mesh, P(*spec))
    return replicated(mesh)


def state_shardings(mesh: Mesh, shapes, shard_params: bool, sharded_fields=()):
    """Shardings for a train-state pytree of shapes: replicated, or for the fields named in
    `sharded_fields` (parameters, optimiser states) `param_sharding` per array."""
    if not shard_params:
        return jax.tree.map(lambda _: replicated(mesh), shapes)
    fields = {f: jax.tree.map(lambda s: param_sharding(mesh, s.shape), getattr(shapes, f))
              for f in sharded_fields}
    rest = jax.tree.map(lambda _: replicated(mesh), shapes)
    return rest.replace(**fields)


def batch_devices(mesh: Mesh) -> int:
    """Devices a batch is split over: all of them (data x model)."""
    return mesh.shape[DATA_AXIS] * mesh.shape[MODEL_AXIS]


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device (the data and model axes)."""
    return NamedSharding(mesh, P((DATA_AXIS, MODEL_AXIS)))


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "train.batch_size") -> None:
    n = batch_devices(mesh)
    if global_batch % n or global_batch % jax.process_count():
        raise ValueError(
            f"{what}={global_batch} must be divisible by the {n} devices the batch is split "
            f"over and the {jax.process_count()} processes; pick a multiple of {n}.")


def local_batch_size(global_batch: int) -> int:
    return global_batch // jax.process_count()


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Assemble a global, batch-sharded jax.Array pytree from this process's numpy slice."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order (numpy)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    rows, seen = [], set()
    for s in shards:
        start = s.index[0].start or 0
        if start not in seen:  # replicas along other axes hold the same rows
            seen.add(start)
            rows.append(np.asarray(s.data))
    return np.concatenate(rows)
