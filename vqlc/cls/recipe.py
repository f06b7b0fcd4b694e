"""MAE's fine-tuning recipe (facebookresearch/mae, main_finetune.py, util/lr_decay.py,
util/lr_sched.py) in optax and jax, for vqlc.cls.vit.ViT, with mixup / cutmix applied to token
maps.

Optimiser (`make_optimizer`): AdamW (torch's defaults: betas 0.9 / 0.999, eps 1e-8) with
parameter groups as MAE's param_groups_lrd builds them:
  - layer-wise lr decay: num_layers = depth + 1; a parameter's layer id is 0 for cls_token,
    pos_embed, patch_embed (and our token `stem`), i + 1 for blocks_i, num_layers for the rest
    (fc_norm / norm, head); its lr is lr * decay ** (num_layers - layer_id): the head gets the
    full lr, blocks_{depth-1} decay ** 1, the embeddings decay ** (depth + 1);
  - weight decay 0 for every 1-D parameter (biases, LayerNorms) and for MAE's no_weight_decay()
    names (cls_token, pos_embed), weight_decay elsewhere (2-D+ kernels, the patch conv, the
    `embed` stem's table);
  - torch's AdamW applies decay as p -= group_lr * wd * p, group_lr including lr_scale; so here
    update = -lr(t) * lr_scale * (adam(g) + wd * p), the chain scale_by_adam ->
    add_decayed_weights(mask) -> per-leaf lr_scale -> scale_by_learning_rate.
Schedule (`mae_lr_schedule`): lr = blr * batch / 256 (FINETUNE.md's ViT-B: blr 5e-4, batch
1024, 100 epochs, 5 warm-up epochs, layer decay 0.65, weight decay 0.05, drop path 0.1), linear
warm-up from 0, then a half-cycle cosine to min_lr (1e-6), per step (MAE's util/lr_sched adjusts
per iteration with fractional epochs: the same curve). MAE's pixel augmentations (RandAugment,
random erasing 0.25, random resized crops) act on images; on token maps they have no direct
counterpart and are not here.

Mixup / cutmix (timm's Mixup in "batch" mode, MAE's arguments: mixup alpha 0.8, cutmix alpha
1.0, prob 1.0, switch prob 0.5, label smoothing 0.1): one draw per batch, the batch mixed with
its own flip (sample i with sample B - 1 - i):
  - with probability `prob` a mix happens; then cutmix with probability `switch_prob` (when both
    alphas are > 0), lam ~ Beta(alpha, alpha) of the chosen kind;
  - mixup: x = lam * x + (1 - lam) * flip(x);
  - cutmix: a box of side int(side * sqrt(1 - lam)) per axis centred at a uniform token,
    clipped to the map (timm's rand_bbox), here in token units (h x w token map, not pixels),
    the flipped batch pasted inside it, and lam corrected to 1 - box area / (h * w);
  - soft targets: one-hot smoothed (on 1 - s + s/K, off s/K), lam * y + (1 - lam) * flip(y);
    rows sum to 1.
On token maps: `mix_vectors` mixes per-token vectors [B, h, w, d] (projected codes, codebook
rows, an `embed` stem's gathered vectors (vit.embed_ids), or the latents a `pixels` stem decodes);
`cut_paste` pastes the cutmix box of a map of any dtype (ids): mixup of ids is undefined, so
`cut_paste` refuses a draw that can be a mixup (use cutmix-only settings, or mix the embedded
vectors). Everything is jax (jit-able); keys come from the train step (fold_in(rng, step)), so a
resumed run draws the same mixes. timm requires an even batch; the flip pairing works for any
size (an odd batch's middle sample is mixed with itself).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp

# MAE's fine-tuning defaults for ViT-B (FINETUNE.md's command and main_finetune.py).
LAYER_DECAY = 0.65
WEIGHT_DECAY = 0.05
BASE_LR = 5e-4
MIN_LR = 1e-6
NO_WEIGHT_DECAY = ("cls_token", "pos_embed")  # timm VisionTransformer.no_weight_decay()
LAYER0 = ("cls_token", "pos_embed", "patch_embed", "stem")
_BLOCK = re.compile(r"^blocks_(\d+)$")


# ------------------------------------------------------------------- layer-wise lr decay

def _key(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", entry)))


def layer_id(path, depth: int) -> int:
    """MAE's get_layer_id_for_vit on a flax path (a tuple of keys or tree-path entries)."""
    top = _key(path[0])
    if top in LAYER0:
        return 0
    match = _BLOCK.match(top)
    if match:
        return int(match.group(1)) + 1
    return depth + 1


def layer_scales(depth: int, decay: float = LAYER_DECAY) -> list:
    """MAE's layer_scales: decay ** (num_layers - i) for i in 0..num_layers, num_layers =
    depth + 1."""
    num_layers = depth + 1
    return [decay ** (num_layers - i) for i in range(num_layers + 1)]


def lr_scales(params, depth: int, decay: float = LAYER_DECAY):
    """A tree like params of each leaf's lr multiplier (python floats)."""
    scales = layer_scales(depth, decay)
    return jax.tree_util.tree_map_with_path(lambda path, _: scales[layer_id(path, depth)], params)


def weight_decay_mask(params):
    """True where AdamW decays: not 1-D parameters (biases, LayerNorms), not cls_token /
    pos_embed (MAE's param_groups_lrd with no_weight_decay())."""
    def decayed(path, leaf):
        return len(leaf.shape) > 1 and _key(path[0]) not in NO_WEIGHT_DECAY
    return jax.tree_util.tree_map_with_path(decayed, params)


class ScaleByTreeState(NamedTuple):
    pass


def scale_by_tree(scales):
    """An optax transformation multiplying each update leaf by its scale (a tree of floats
    shaped like the params)."""
    import optax

    def init(params):
        del params
        return ScaleByTreeState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

    return optax.GradientTransformation(init, update)


def mae_lr_schedule(lr: float, warmup_steps: int, total_steps: int, min_lr: float = MIN_LR):
    """MAE's util/lr_sched: linear warm-up 0 -> lr over warmup_steps, then a half-cycle cosine
    lr -> min_lr by total_steps (held at min_lr after)."""
    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = lr * step / max(warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
        cosine = min_lr + (lr - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(step < warmup_steps, warm, cosine)
    return schedule


def make_optimizer(params, learning_rate, *, depth: int, layer_decay: float = LAYER_DECAY,
                   weight_decay: float = WEIGHT_DECAY, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, grad_clip: float = 0.0):
    """MAE's AdamW with layer-wise lr decay (see the module docstring). learning_rate: a float
    or an optax schedule (e.g. mae_lr_schedule). grad_clip > 0 clips the global norm first
    (MAE's --clip_grad, off by default)."""
    import optax
    chain = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    chain += [optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
              optax.add_decayed_weights(weight_decay, mask=weight_decay_mask(params)),
              scale_by_tree(lr_scales(params, depth, layer_decay)),
              optax.scale_by_learning_rate(learning_rate)]
    return optax.chain(*chain)


# ------------------------------------------------------------------------- mixup / cutmix

@dataclasses.dataclass(frozen=True)
class MixupConfig:
    """timm's Mixup arguments as MAE's fine-tuning sets them."""
    num_classes: int
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1

    def __post_init__(self):
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError("mixup_alpha and cutmix_alpha must be >= 0.")
        if not (0.0 <= self.prob <= 1.0 and 0.0 <= self.switch_prob <= 1.0):
            raise ValueError("prob and switch_prob must be in [0, 1].")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("label_smoothing must be in [0, 1).")

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    @property
    def can_mixup(self) -> bool:
        """Whether a draw may be a mixup (a blend, undefined for ids)."""
        return self.prob > 0 and self.mixup_alpha > 0 and not (
            self.cutmix_alpha > 0 and self.switch_prob >= 1.0)


@flax.struct.dataclass
class Mix:
    """One batch's draw. lam: the weight of the unflipped batch (box-corrected for cutmix);
    use_cutmix: bool; mask: bool [h, w], True inside the pasted box (all False for mixup or no
    mix); box: int32 [4] (y_lo, y_hi, x_lo, x_hi), half-open, in tokens."""
    lam: jax.Array
    use_cutmix: jax.Array
    mask: jax.Array
    box: jax.Array
    can_mixup: bool = flax.struct.field(pytree_node=False, default=True)


def _beta(key, alpha: float):
    if alpha <= 0:
        return jnp.float32(1.0)
    return jax.random.beta(key, alpha, alpha).astype(jnp.float32)


def cutmix_box(key, lam, hw):
    """timm's rand_bbox in token units: (y_lo, y_hi, x_lo, x_hi) int32 for a map of hw."""
    h, w = hw
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(h * ratio).astype(jnp.int32)
    cut_w = jnp.floor(w * ratio).astype(jnp.int32)
    ky, kx = jax.random.split(key)
    cy = jax.random.randint(ky, (), 0, h)
    cx = jax.random.randint(kx, (), 0, w)
    y_lo, y_hi = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + (cut_h + 1) // 2, 0, h)
    x_lo, x_hi = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + (cut_w + 1) // 2, 0, w)
    return jnp.stack([y_lo, y_hi, x_lo, x_hi]).astype(jnp.int32)


def draw_mix(key, hw, config: MixupConfig) -> Mix:
    """One batch's mix for a token map of hw = (h, w) (timm's _params_per_batch + the cutmix
    box with lam correction). Compiled (hw and config static), also when called eagerly."""
    return _draw_mix(key, tuple(int(n) for n in hw), config)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw_mix(key, hw, config: MixupConfig) -> Mix:
    h, w = hw
    k_apply, k_switch, k_mixup, k_cutmix, k_box = jax.random.split(key, 5)
    apply = jax.random.uniform(k_apply) < config.prob if config.enabled else jnp.bool_(False)
    if config.mixup_alpha > 0 and config.cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch) < config.switch_prob
    else:
        use_cutmix = jnp.bool_(config.cutmix_alpha > 0)
    lam_draw = jnp.where(use_cutmix, _beta(k_cutmix, config.cutmix_alpha),
                         _beta(k_mixup, config.mixup_alpha))
    use_cutmix = apply & use_cutmix
    lam = jnp.where(apply, lam_draw, 1.0)
    box = cutmix_box(k_box, lam, hw)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    mask = ((rows >= box[0]) & (rows < box[1]) & (cols >= box[2]) & (cols < box[3]))
    mask = mask & use_cutmix
    area = jnp.sum(mask).astype(jnp.float32)
    lam = jnp.where(use_cutmix, 1.0 - area / (h * w), lam).astype(jnp.float32)
    return Mix(lam=lam, use_cutmix=use_cutmix, mask=mask,
               box=jnp.where(use_cutmix, box, jnp.zeros_like(box)), can_mixup=config.can_mixup)


def _check_map(x, mix: Mix, what: str, min_ndim: int):
    if x.ndim < min_ndim or tuple(x.shape[1:3]) != tuple(mix.mask.shape):
        dims = "B, h, w, d" if min_ndim == 4 else "B, h, w, ..."
        raise ValueError(f"{what} takes a batch of token maps [{dims}]"
                         f" with (h, w) = {tuple(mix.mask.shape)} (the draw's map), got "
                         f"{list(x.shape)}.")


def mix_vectors(x: jax.Array, mix: Mix) -> jax.Array:
    """Per-token float vectors [B, h, w, d] mixed with their flip: cutmix pastes the box, mixup
    blends lam * x + (1 - lam) * flip(x)."""
    _check_map(x, mix, "mix_vectors", 4)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"mix_vectors blends float vectors, got {x.dtype}; for ids use "
                         "cut_paste (cutmix only) or mix the embedded vectors (vit.embed_ids).")
    flipped = x[::-1]
    pasted = jnp.where(mix.mask[None, :, :, None], flipped, x)
    lam = mix.lam.astype(x.dtype)
    blended = lam * x + (1 - lam) * flipped
    return jnp.where(mix.use_cutmix, pasted, blended)


def cut_paste(x: jax.Array, mix: Mix) -> jax.Array:
    """A map [B, h, w, ...] of any dtype (ids) with the flipped batch pasted in the cutmix box;
    refuses a draw whose settings allow mixup (ids cannot be blended)."""
    _check_map(x, mix, "cut_paste", 3)
    if mix.can_mixup:
        raise ValueError("cut_paste cannot apply a mixup draw (token ids cannot be blended): "
                         "set mixup_alpha=0 (cutmix only), or mix the embedded vectors with "
                         "mix_vectors (vit.embed_ids for an `embed` stem).")
    mask = mix.mask.reshape(mix.mask.shape + (1,) * (x.ndim - 3))
    return jnp.where(mask[None], x[::-1], x)


def mix_targets(labels: jax.Array, mix: Optional[Mix], num_classes: int,
                smoothing: float = 0.1) -> jax.Array:
    """timm's mixup_target: smoothed one-hot [B, K] (on 1 - s + s/K, off s/K) blended with its
    flip by lam; no mix (None) = smoothed one-hot. Rows sum to 1."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    y = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (on - off) + off
    if mix is None:
        return y
    return mix.lam * y + (1.0 - mix.lam) * y[::-1]


def mix_batch(key, x: jax.Array, labels: jax.Array, config: MixupConfig):
    """(mixed vectors, soft targets, the Mix) for per-token vectors [B, h, w, d]."""
    mix = draw_mix(key, x.shape[1:3], config)
    return (mix_vectors(x, mix), mix_targets(labels, mix, config.num_classes,
                                             config.label_smoothing), mix)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """timm's SoftTargetCrossEntropy: mean over the batch of -sum(targets * log_softmax)."""
    return jnp.mean(-jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1))
