"""The tokenizer's train state: generator, discriminator, their optimisers, EMA codes, usage.

Frozen networks (the LC codebook, LPIPS' VGG16) are deliberately not here: they are never
optimised and the LC codebook is written once to <workdir>/codebook.npy, not every checkpoint.
"""
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vqlc import parallel


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of optimiser steps taken
    g_params: Any  # encoder, decoder, quant convs, trainable quantizer parts
    g_opt_state: Any
    d_params: Any
    d_batch_stats: Any
    d_opt_state: Any
    ema: Any  # the EMA quantizer's codebook statistics ({} for other quantizers)
    usage: jax.Array  # int32 [K]: tokens assigned to each code since the last metrics report
    rng: jax.Array  # base key; each step folds in its step number


# What mesh.shard_params splits over the devices; the rest (step, EMA statistics, usage counts,
# BatchNorm statistics, RNG) is small and stays replicated.
SHARDED_FIELDS = ("g_params", "g_opt_state", "d_params", "d_opt_state")


def init_train_state(model: nn.Module, disc: nn.Module, g_tx: optax.GradientTransformation,
                     d_tx: optax.GradientTransformation, *, image_size: int, seed: int,
                     mesh, abstract: bool = False,
                     shard_params: bool = False) -> tuple[TrainState, dict]:
    """Initialise straight into replicated arrays on `mesh`.

    Returns (state, frozen) where `frozen` holds the model's non-trainable variable
    collections other than 'ema' (for LC: {'frozen': {... 'codebook': zeros}}), to be filled
    from the codebook file by the caller. With `abstract=True` the leaves are
    jax.ShapeDtypeStructs carrying their shardings: a restore target that costs no compile
    (loading a tokenizer for inference). `shard_params=True` splits the parameters and
    optimiser states over the mesh (FSDP; see vqlc.parallel.param_sharding).
    """
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)

    def init():
        k_model, k_disc, k_state = jax.random.split(jax.random.key(seed), 3)
        variables = model.init({"params": k_model, "dropout": k_model}, x, train=False)
        variables = dict(variables)
        g_params = variables.pop("params")
        ema = variables.pop("ema", {})
        variables.pop("intermediates", None)
        d_vars = disc.init(k_disc, x, train=False)
        state = TrainState(
            step=jnp.zeros((), jnp.int32), g_params=g_params, g_opt_state=g_tx.init(g_params),
            d_params=d_vars["params"], d_batch_stats=d_vars.get("batch_stats", {}),
            d_opt_state=d_tx.init(d_vars["params"]), ema=ema,
            usage=jnp.zeros((model.quantizer.codebook_size,), jnp.int32),
            rng=jax.random.key_data(k_state))
        return state, variables

    shapes = jax.eval_shape(init)
    # The frozen LC codebook is split along K over the model axis (whole when it has size 1).
    frozen_shardings = {name: jax.tree.map(
        lambda _: (parallel.codebook_sharding(mesh) if name == "frozen"
                   else parallel.replicated(mesh)), tree) for name, tree in shapes[1].items()}
    out_shardings = (parallel.state_shardings(mesh, shapes[0], shard_params, SHARDED_FIELDS),
                     frozen_shardings)
    if abstract:
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, out_shardings)
    return jax.jit(init, out_shardings=out_shardings)()


def count_params(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))
