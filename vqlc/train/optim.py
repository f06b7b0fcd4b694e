"""Optimisers of the release: Adam (0.5, 0.9), linear warmup then half-cycle cosine."""
import ml_collections
import optax


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    warmup = min(optim.warmup_steps, num_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1), end_value=optim.min_lr)


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    """Adam without weight decay or clipping; used for the generator and the discriminator."""
    return optax.adam(learning_rate_schedule(optim, num_steps), b1=optim.b1, b2=optim.b2,
                      eps=optim.eps)
