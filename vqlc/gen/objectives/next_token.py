"""Next-token objective of the GPT generators: a cross-entropy over a 100K vocabulary that never
builds the full logits, and the two input corruptions used while training.

At vocabulary 101,000 the logits of a [8, 256] batch alone take 0.8 GB in float32, and their
gradient as much again: more than the rest of a GPT-B step. `chunked_cross_entropy` computes the
output layer and the loss together, a slice of the sequence at a time, and rematerialises each
slice's logits in the backward pass, so only one slice's [B, chunk, V] logits are alive at once.

Softmax vocabulary. taming's minGPT (the release's GPT-LC) takes `F.cross_entropy` over the
network's whole output vocabulary, class ids included, although targets are always image codes.
That is the default here (`restrict_to=None`). `restrict_to=codebook_size` normalises over the
image codes only (the first `codebook_size` columns of the head): a cleaner objective for a model
that never has to predict a class id, but not the release's.
"""
import jax
import jax.numpy as jnp

DEFAULT_CHUNK_SIZE = 32  # sequence positions per chunk: logits of [B, 32, V] at a time


def chunked_cross_entropy(hidden, head_kernel, targets, *, chunk_size=DEFAULT_CHUNK_SIZE,
                          weights=None, restrict_to=None):
    """Mean next-token cross-entropy of `hidden @ head_kernel` against `targets`, in chunks.

    hidden: float [B, T, D] (bfloat16 or float32), the GPT's last hidden states (after the final
      norm). head_kernel: [D, V], the untied, bias-free output layer. targets: int [B, T], each
      in [0, V) (or [0, restrict_to)). weights: optional [B, T]; the loss is then the weighted mean
      sum(w * nll) / sum(w) (zero when every weight is zero).
    chunk_size: sequence positions per chunk. The sequence axis is split, not the batch, so a
      batch sharded over devices stays sharded in every chunk; T need not be a multiple (the last
      chunk is padded with zero-weight positions).
    restrict_to: None (the release's softmax over all V outputs) or n: softmax over the first n.

    The matmul runs in the inputs' promoted dtype with float32 accumulation and output (cast the
    kernel to bfloat16 to get a bfloat16 matmul); log-sum-exp and the loss are float32. Equals
    `plain_cross_entropy` and its gradients up to float32 rounding.
    """
    head_kernel = _restrict(head_kernel, restrict_to)
    weights = _default_weights(targets, weights)
    length = hidden.shape[1]
    chunk = max(1, min(chunk_size, length))
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length
    # Padded positions get weight 0 (and target 0, a valid id), so they add nothing.
    hidden_chunks = _split_sequence(hidden, chunk, pad)
    target_chunks = _split_sequence(targets, chunk, pad)
    weight_chunks = _split_sequence(weights, chunk, pad)

    # Checkpointed: the backward pass recomputes a chunk's logits from its hidden states rather
    # than keeping [B, chunk, V] per chunk alive between the passes.
    @jax.checkpoint
    def chunk_loss_sum(hidden_chunk, target_chunk, weight_chunk):
        nll = _nll(_logits(hidden_chunk, head_kernel), target_chunk)
        return jnp.sum(nll * weight_chunk)

    def step(total, chunk_inputs):
        return total + chunk_loss_sum(*chunk_inputs), None

    loss_sum, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32),
                               (hidden_chunks, target_chunks, weight_chunks))
    return _weighted_mean(loss_sum, weights)


def plain_cross_entropy(hidden, head_kernel, targets, weights=None, restrict_to=None):
    """The reference: full [B, T, V] float32 logits, then optax's integer-label cross-entropy."""
    import optax  # only the reference needs it

    head_kernel = _restrict(head_kernel, restrict_to)
    weights = _default_weights(targets, weights)
    nll = optax.softmax_cross_entropy_with_integer_labels(_logits(hidden, head_kernel), targets)
    return _weighted_mean(jnp.sum(nll * weights), weights)


def corrupt_tokens(key, codes, pkeep, codebook_size):
    """The release's pkeep corruption of a GPT's input image tokens (targets stay clean).

    Each token is kept with probability `pkeep`, else replaced by an id drawn uniformly from the
    image codes [0, codebook_size) (which may redraw the same id, as in the release). The
    release draws from the transformer's whole vocabulary, class ids included, feeding class
    tokens in image positions; that flaw is not copied. Pass image codes only, not the class
    token. pkeep = 1 returns `codes` unchanged.
    """
    if isinstance(pkeep, (int, float)) and pkeep >= 1.0:
        return codes
    keep_key, draw_key = jax.random.split(key)
    keep = jax.random.bernoulli(keep_key, pkeep, codes.shape)
    random_codes = jax.random.randint(draw_key, codes.shape, 0, codebook_size, dtype=codes.dtype)
    return jnp.where(keep, codes, random_codes)


def drop_labels(key, labels, prob, null_label):
    """Class dropout for classifier-free guidance: each label becomes `null_label` with
    probability `prob` (prob = 0 returns `labels` unchanged)."""
    if isinstance(prob, (int, float)) and prob <= 0.0:
        return labels
    drop = jax.random.bernoulli(key, prob, labels.shape)
    return jnp.where(drop, jnp.asarray(null_label, labels.dtype), labels)


def _logits(hidden, head_kernel):
    """[..., D] @ [D, V] with float32 accumulation and output, whatever the input dtypes."""
    return jnp.matmul(hidden, head_kernel, preferred_element_type=jnp.float32)


def _nll(logits, targets):
    """Per-position negative log-likelihood from float32 logits [..., V]."""
    log_normaliser = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_normaliser - target_logit


def _restrict(head_kernel, restrict_to):
    return head_kernel if restrict_to is None else head_kernel[:, :restrict_to]


def _default_weights(targets, weights):
    if weights is None:
        return jnp.ones(targets.shape, jnp.float32)
    return weights.astype(jnp.float32)


def _weighted_mean(loss_sum, weights):
    # max(.., tiny): an all-zero weight mask gives loss 0 and zero gradients, not NaN.
    return loss_sum / jnp.maximum(jnp.sum(weights), jnp.finfo(jnp.float32).tiny)


def _split_sequence(x, chunk, pad):
    """[B, T, ...] -> [T_padded / chunk, B, chunk, ...], chunks leading for the scan."""
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    batch, length = x.shape[:2]
    x = x.reshape((batch, length // chunk, chunk) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)
