"""A few tokenizer train steps on a mesh, as the trainer compiles them: for tests that compare
layouts (FSDP, a split codebook)."""
import jax

from vqlc import parallel
from vqlc.models import lpips as lpips_lib
from vqlc.train import trainer
from vqlc.train.step import make_train_step


def run_steps(config, mesh, batch, workdir: str, steps: int = 2):
    """(state, last metrics, frozen variables) after `steps` steps on `batch` from a fresh
    state of `config` on `mesh` (with `mesh` as the context mesh, as the trainer runs)."""
    net, disc, g_tx, d_tx, state, frozen = trainer.setup_model(config, workdir, mesh)
    with jax.set_mesh(mesh):
        sharding = jax.tree.map(lambda x: x.sharding, state)
        step = jax.jit(make_train_step(net, disc, g_tx, d_tx, config.loss,
                                       lambda p, x, y: lpips_lib.lpips(x, y, params=p)),
                       out_shardings=(sharding, parallel.replicated(mesh)))
        lp = jax.device_put(lpips_lib.load_vgg16_lpips_params(), parallel.replicated(mesh))
        for _ in range(steps):
            state, metrics = step(state, parallel.global_batch(batch, mesh), frozen, lp)
    return state, metrics, frozen
