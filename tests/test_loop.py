"""The shared training loop (vqlc.train.loop), once, on a toy: linear regression with optax.

No tokenizer here: what every trainer inherits from the loop (resume, the non-finite guard,
SIGTERM, cadence) is tested on a model that takes microseconds a step.
"""
import os
import signal

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vqlc import checkpoint
from vqlc.train import loop, reporting

DIM, BATCH = 4, 8
TRUE_W = np.arange(1, DIM + 1, dtype=np.float32) / DIM
TX = optax.adam(0.05)


@flax.struct.dataclass
class ToyState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState


def init_state() -> ToyState:
    params = {"w": jnp.zeros((DIM,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
    return ToyState(step=jnp.zeros((), jnp.int32), params=params, opt_state=TX.init(params))


def _example(i):
    x = np.random.default_rng(int(i)).standard_normal(DIM).astype(np.float32)
    return {"x": x, "y": np.float32(x @ TRUE_W + 0.5)}


def data_iterator():
    """A grain iterator (its position is checkpointed): batch i is always the same batch."""
    ds = grain.MapDataset.range(10**6).map(_example).batch(BATCH, drop_remainder=True)
    return iter(ds.to_iter_dataset())


@jax.jit
def toy_step(state: ToyState, batch):
    def loss_fn(params):
        pred = batch["x"] @ params["w"] + params["b"]
        return jnp.mean((pred - batch["y"]) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    finite = jnp.isfinite(loss)
    updates, opt_state = TX.update(grads, state.opt_state, state.params)
    new = ToyState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                   opt_state=opt_state)
    # As vqlc.train.step does: a non-finite step leaves the state as it was.
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state.replace(step=new.step))
    return new, {"loss": loss, "finite": finite.astype(jnp.float32)}


def train(workdir, num_steps, *, cadence=loop.Cadence(log_every=2, checkpoint_every=5,
                                                      image_every=4),
          step_hook=None, batch_hook=None):
    """A minimal trainer on the loop, as a generator's would be. Returns (result, previews)."""
    manager = checkpoint.make_manager(str(workdir), keep=10)
    it = data_iterator()
    state, start = loop.resume(manager, init_state(), it)
    reporter = reporting.Reporter(str(workdir), num_steps=num_steps, start_step=start,
                                  batch_size=BATCH, progress_bar=False)
    previews = []

    def next_batch():
        batch = next(it)
        return batch_hook(batch) if batch_hook else batch

    def train_step(state, batch):
        state, metrics = toy_step(state, batch)
        if step_hook:
            step_hook(int(state.step))
        return state, metrics

    def on_log(step, state, scalars):
        scalars["w_norm"] = float(jnp.linalg.norm(state.params["w"]))
        return state, scalars

    try:
        result = loop.run_loop(state, train_step=train_step, next_batch=next_batch,
                               num_steps=num_steps, cadence=cadence, manager=manager,
                               reporter=reporter, data_iterator=it, on_log=on_log,
                               on_preview=lambda step, state: previews.append(step))
    finally:
        reporter.close()
        manager.close()
    return result, previews


def saved_steps(workdir):
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")))


def logged_steps(workdir):
    return [r["step"] for r in reporting.read_metrics(str(workdir))]


def assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    result, previews = train(workdir, 12)
    return workdir, result, previews


def test_loss_goes_down(reference):
    workdir, result, _ = reference
    assert result.step == 12 and not result.stopped and int(result.state.step) == 12
    losses = [r["loss"] for r in reporting.read_metrics(str(workdir))]
    assert losses[-1] < 0.5 * losses[0], losses
    assert all("w_norm" in r and "images_per_s" in r and "finite" not in r
               for r in reporting.read_metrics(str(workdir)))


def test_cadence(reference):
    workdir, _, previews = reference
    # log_every 2, checkpoint_every 5, image_every 4, 12 steps: the last step does all three,
    # and every checkpoint step is also logged (the non-finite check runs before each save).
    assert logged_steps(workdir) == [2, 4, 5, 6, 8, 10, 12]
    assert saved_steps(workdir) == [5, 10, 12]
    assert previews == [4, 8, 12]


def test_resume_continues_at_the_saved_step_identically(reference, tmp_path):
    _, ref, _ = reference
    first, _ = train(tmp_path, 7)  # checkpoints 5 and 7 (the last step)
    assert first.step == 7 and saved_steps(tmp_path) == [5, 7]
    resumed, previews = train(tmp_path, 12)
    assert resumed.step == 12 and previews == [8, 12]
    assert_same_params(ref.state.params, resumed.state.params)
    assert_same_params(ref.state.opt_state, resumed.state.opt_state)
    assert logged_steps(tmp_path) == [2, 4, 5, 6, 7, 8, 10, 12]


def test_nonfinite_loss_raises_and_keeps_the_previous_checkpoint(tmp_path):
    calls = {"n": 0}

    def nan_from_batch_7(batch):
        calls["n"] += 1
        if calls["n"] >= 7:
            batch = dict(batch, y=np.full_like(batch["y"], np.nan))
        return batch

    with pytest.raises(FloatingPointError, match=r"Non-finite loss in 2 step\(s\) up to step 8"):
        train(tmp_path, 12, batch_hook=nan_from_batch_7)
    assert saved_steps(tmp_path) == [5]  # nothing from a non-finite step was saved
    assert logged_steps(tmp_path) == [2, 4, 5, 6]
    manager = checkpoint.make_manager(str(tmp_path), keep=10)
    restored = checkpoint.restore_latest(manager, init_state())
    manager.close()
    assert int(restored.step) == 5
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored))


def test_sigterm_saves_and_stops_resumably(reference, tmp_path):
    _, ref, _ = reference
    before = signal.getsignal(signal.SIGTERM)

    def sigterm_at_step_3(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped, previews = train(tmp_path, 12, step_hook=sigterm_at_step_3)
    assert stopped.stopped and stopped.step == 3 and int(stopped.state.step) == 3
    assert saved_steps(tmp_path) == [3] and logged_steps(tmp_path) == [2, 3]
    assert previews == [3]  # the stop step is a last step: preview too
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back
    resumed, _ = train(tmp_path, 12)
    assert resumed.step == 12 and not resumed.stopped
    assert_same_params(ref.state.params, resumed.state.params)
    assert saved_steps(tmp_path) == [3, 5, 10, 12]


def test_cadence_refuses_a_zero_interval():
    with pytest.raises(ValueError, match="checkpoint_every=0"):
        loop.Cadence(log_every=1, checkpoint_every=0)
