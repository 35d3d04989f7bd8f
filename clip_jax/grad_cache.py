"""Gradient accumulation that keeps every negative (GradCache, Gao et al. 2021), for any model family.

Splitting a batch of B into k micro-batches and averaging k contrastive losses is a different objective: each
example then sees B/k - 1 negatives instead of B - 1. Here the loss is always the loss of the whole batch:

  1. embed all k micro-batches with the towers, storing no activations (a scan of forward passes);
  2. compute the (sharded, ring) loss once on the full batch of embeddings and its gradient w.r.t. them;
  3. re-run each micro-batch's towers under `jax.vjp`, pulling that embedding gradient back to the parameters,
     and sum the parameter gradients.

Peak activation memory is that of one micro-batch; the price is one extra forward pass per step. Terms that are
already per-example (CoCa's captioning sum of NLLs) pass through the same machinery: their micro-batch sums add
up to the full-batch sum, and their cotangent is the same for every micro-batch.

Micro-batch i takes rows i*m..(i+1)*m-1 of *every device's* slice (m = per-device batch / k), so every device
works on every micro-batch and no data moves between devices to form them or to reassemble the embeddings.

Randomness (FLIP patch dropout) travels as a batch field: 'patch_keys', one PRNG key per example, is split into
micro-batches with the images, so both passes of a micro-batch (step 1 and the vjp of step 3) drop the same
patches, and each example drops the same patches as in the full-batch step.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from clip_jax import noise_scale, optim, sharding

# Model outputs that carry gradient back into the towers (see TwoTower.__call__ for the interface).
_DIFFERENTIABLE = ("img", "txt", "log_t", "bias", "caption_nll")


def _split(x, k: int, n_dev: int):
    """[B, ...] with the batch sharded over n_dev devices -> [k, B/k, ...]; micro i = rows i*m.. of each device."""
    b = x.shape[0]
    m = b // (n_dev * k)
    x = x.reshape(n_dev, k, m, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape(k, n_dev * m, *x.shape[3:])


def _merge(x, k: int, n_dev: int):
    """Inverse of _split: [k, B/k, ...] -> [B, ...] in the original row order."""
    m = x.shape[1] // n_dev
    x = x.reshape(k, n_dev, m, *x.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape(k * n_dev * m, *x.shape[3:])


def value_and_grad(params, frozen, batch, *, graphdef, cfg, mesh, total_loss):
    """((loss, aux), grads) of `total_loss(model(batch))` over the whole batch, with cfg.accum_steps micro-batches.

    Gradients are w.r.t. `params` (the trainable dict); `frozen` (optim.split) is used as a constant. Equal (up to
    float summation order) to jax.value_and_grad of the single full-batch loss. With cfg.noise_scale, aux also
    holds noise_scale.SHARES: float32 [k], the squared norm of each micro-batch's share of the gradient.
    """
    k = cfg.accum_steps
    n_dev = mesh.devices.size
    micro_sh = NamedSharding(mesh, P(None, sharding.BATCH_AXES))
    batch_sh = sharding.batch_sharding(mesh)
    micro = {name: jax.lax.with_sharding_constraint(_split(x, k, n_dev), micro_sh) for name, x in batch.items()}

    def forward(p, mb):
        out = apply(nnx.merge(graphdef, optim.merge(p, frozen)), mb)
        return {name: v for name, v in out.items() if name in _DIFFERENTIABLE}, out.get("caption_tokens")

    # 1. Embeddings of every micro-batch; nothing is differentiated here, so no activation outlives its step.
    def embed(_, mb):
        out, count = forward(params, mb)
        return None, (out, count)

    _, (outs, counts) = jax.lax.scan(embed, None, micro)

    # 2. The full-batch loss and its gradient w.r.t. the embeddings (and the scalars the loss reads).
    full = {
        "img": jax.lax.with_sharding_constraint(_merge(outs["img"], k, n_dev), batch_sh),
        "txt": jax.lax.with_sharding_constraint(_merge(outs["txt"], k, n_dev), batch_sh),
        "log_t": outs["log_t"][0],
        "bias": outs["bias"][0],
    }
    if "caption_nll" in outs:
        full["caption_nll"] = jnp.sum(outs["caption_nll"])
    tokens = None if counts is None else jnp.sum(counts)
    loss_of = lambda emb: total_loss({**emb, **({} if tokens is None else {"caption_tokens": tokens})})
    (loss, aux), d_full = jax.value_and_grad(loss_of, has_aux=True)(full)

    # 3. Cotangents per micro-batch: its rows of the embedding gradient. log_t and bias are read once by the
    # loss but produced by every micro-batch's forward, so each gets 1/k of their gradient.
    cot = {
        "img": jax.lax.with_sharding_constraint(_split(d_full["img"], k, n_dev), micro_sh),
        "txt": jax.lax.with_sharding_constraint(_split(d_full["txt"], k, n_dev), micro_sh),
        "log_t": jnp.broadcast_to(d_full["log_t"] / k, (k,)),
        "bias": jnp.broadcast_to(d_full["bias"] / k, (k,)),
    }
    if "caption_nll" in d_full:
        cot["caption_nll"] = jnp.broadcast_to(d_full["caption_nll"], (k,))

    def backward(acc, xs):
        mb, c = xs
        _, pullback = jax.vjp(lambda p: forward(p, mb)[0], params)
        (g,) = pullback(c)
        # cfg.noise_scale: each share's squared norm, for the gradient noise scale (noise_scale.py).
        return jax.tree.map(jnp.add, acc, g), noise_scale.sq_norm(g) if cfg.noise_scale else None

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, share_sq = jax.lax.scan(backward, zeros, (micro, cot))
    if cfg.noise_scale:
        aux = {**aux, noise_scale.SHARES: share_sq}
    return (loss, aux), grads


def with_patch_keys(batch, rng, cfg, mesh):
    """batch plus 'patch_keys' when model.image.patch_dropout > 0: FLIP patch dropout's per-example PRNG keys,
    uint32 [B, 2] from `rng` (the train step's), sharded like the batch (each device draws its own rows). Per
    example, so the patches an example drops do not depend on how the batch is split into micro-batches."""
    if not cfg.model.image.get("patch_dropout", 0.0):
        return batch
    keys = jax.random.split(jax.random.fold_in(rng, 0), cfg.batch_size)
    return {**batch, "patch_keys": jax.lax.with_sharding_constraint(keys, sharding.batch_sharding(mesh))}


def apply(model, batch):
    """The model on a batch or micro-batch: 'image', 'tokens', and 'patch_keys' when the train step drew them."""
    return model(batch["image"], batch["tokens"], patch_keys=batch.get("patch_keys"))


def make(cfg, mesh, graphdef, total_loss):
    """A value_and_grad(trainable, frozen, batch) for the train step (gradients w.r.t. trainable only): plain
    autodiff when accum_steps == 1."""
    if cfg.accum_steps == 1:
        loss_fn = lambda p, f, b: total_loss(apply(nnx.merge(graphdef, optim.merge(p, f)), b))
        return jax.value_and_grad(loss_fn, has_aux=True)
    return functools.partial(value_and_grad, graphdef=graphdef, cfg=cfg, mesh=mesh, total_loss=total_loss)
