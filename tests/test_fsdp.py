"""mesh.shard_params (FSDP): parameters and optimiser states split over the devices, with the
numerics of the replicated run, less state per device, and checkpoints that load either way."""
import jax
import numpy as np
import pytest

from tests import train_steps
from vqlc.configs import default as default_config
from vqlc import parallel
from vqlc.train import trainer
from vqlc.train.state import SHARDED_FIELDS


def _config(**overrides):
    c = default_config.get_config("tiny")
    c.update_from_flattened_dict(overrides)
    return c


def _bytes_on_device(tree, device) -> int:
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree)
               for s in leaf.addressable_shards if s.device == device)


def test_param_sharding_picks_a_divisible_dimension():
    mesh = parallel.make_mesh(4)
    spec = lambda shape: tuple(parallel.param_sharding(mesh, shape).spec)  # noqa: E731
    assert spec((3, 3, 64, 128)) == (None, None, None, "data")  # the largest dimension
    assert spec((3, 3, 512, 6)) == (None, None, "data", None)
    assert spec((130, 127)) == ()  # nothing divisible by 4: replicated
    assert spec((128,)) == ()  # small: replicated
    assert tuple(parallel.param_sharding(parallel.make_mesh(1), (4096, 4096)).spec) == ()


def test_sharded_training_equals_replicated_with_a_quarter_of_the_state(tmp_path):
    from vqlc.data import make_train_iterator
    batch = next(make_train_iterator(_config().data, batch_size=8, seed=0))
    mesh = parallel.make_mesh(4)
    out = {}
    for shard in (False, True):
        config = _config(**{"mesh.shard_params": shard})
        state, metrics, _ = train_steps.run_steps(config, mesh, batch, str(tmp_path / "w"))
        out[shard, "bytes"] = sum(_bytes_on_device(getattr(state, f), mesh.devices.flat[0])
                                  for f in SHARDED_FIELDS)
        out[shard] = (jax.device_get(state.g_params), float(metrics["loss"]), state)
    sharded_state = out[True][2]
    specs = [x.sharding.spec for x in jax.tree.leaves(sharded_state.g_params)]
    assert any("data" in s for s in specs)  # the big kernels are split ...
    assert out[True, "bytes"] < 0.4 * out[False, "bytes"]  # ... so each device holds far less
    assert out[True][1] == pytest.approx(out[False][1], rel=1e-5)
    for a, b in zip(jax.tree.leaves(out[False][0]), jax.tree.leaves(out[True][0])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_sharded_run_checkpoints_and_loads_replicated(tmp_path):
    from vqlc import Tokenizer
    config = _config(**{"mesh.shard_params": True, "train.num_steps": 3,
                        "train.checkpoint_every": 3, "eval.at_end": False})
    state, _ = trainer.train_and_evaluate(config, str(tmp_path))
    assert any("data" in x.sharding.spec for x in jax.tree.leaves(state.g_params))
    tok = Tokenizer.load(str(tmp_path))  # one device: the same weights, whole
    assert tok.step == 3
    for a, b in zip(jax.tree.leaves(tok.variables["params"]), jax.tree.leaves(state.g_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
