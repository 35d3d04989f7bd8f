"""fp32 precision of the sharded losses against float64 numpy, at CLIP's temperatures and on trained embeddings.

A trained CLIP runs at t = 100 with positive pairs aligned: s_ii ~ LSE_j s_ij ~ 100 while the loss is small, so
any formula that subtracts two numbers of size t in fp32 loses most of its digits (DESIGN.md §4). The reference
here is the literal formula evaluated in float64 (its cancellation costs ~1e-14 relative, not fp32's ~1e-7), with
the gradients written out by hand; open_clip's ClipLoss / SigLipLoss, run in float64, confirm it is the same loss.
Every variant (ring with default and 2-row tiles, all-gather), both meshes, t in {1, 10, 100} and trained and
random embeddings must give the value and all gradients within 1e-5 relative (max abs error / max abs value).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from reference_libs import open_clip_module

from clip_jax import losses

AXES = ("data", "fsdp")
TOL = 1e-5
BATCH, DIM = 64, 32
TEMPERATURES = (1.0, 10.0, 100.0)
# Text = image + noise * N(0, I), normalised: noise 1.0 gives positive cosines ~0.73 and a loss of ~1e-6 at t = 100
# (a well-trained model's batch), 1.5 gives ~0.59 and ~0.8; None draws independent (untrained) texts.
ALIGNMENTS = (1.0, 1.5, None)


def embeddings(noise, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, DIM))
    y = x + noise * rng.standard_normal((BATCH, DIM)) if noise is not None else rng.standard_normal((BATCH, DIM))
    unit = lambda v: (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    return unit(x), unit(y)


def _lse(a, axis):
    m = a.max(axis=axis, keepdims=True)
    return m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))


def float64_reference(kind, x, y, t, bias):
    """(loss, dL/dx, dL/dy, dL/dlog_t, dL/dbias) of the mean loss, all in float64 from the fp32 inputs."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    s = t * x @ y.T
    b = s.shape[0]
    if kind == "softmax":  # L = 1/(2B) sum_i [LSE_j s_ij - s_ii] + [LSE_i s_ij - s_jj]
        row, col = _lse(s, 1), _lse(s, 0)
        loss = (row.sum() + col.sum() - 2 * np.trace(s)) / (2 * b)
        g = (np.exp(s - row) + np.exp(s - col) - 2 * np.eye(b)) / (2 * b)  # dL/ds
        dbias = 0.0
    else:  # L = -1/B sum_ij log sigmoid(z_ij (s_ij + b)), z = 2I - 1
        z = 2 * np.eye(b) - 1
        margin = z * (s + bias)
        loss = np.logaddexp(0, -margin).sum() / b
        g = -z / (1 + np.exp(margin)) / b
        dbias = g.sum()
    return loss, t * g @ y, t * g.T @ x, (g * s).sum(), dbias


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-300))


def bias_for(t):
    return -10.0 if t > 1 else 0.0  # SigLIP's init bias at its working temperatures


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_float64_reference_is_open_clips_loss(kind):
    """The reference above and open_clip's loss (in float64) agree on value and gradients: same definition."""
    loss_mod = open_clip_module("loss")
    x, y = embeddings(1.5)
    for t in TEMPERATURES:
        xt, yt = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, y))
        log_t = torch.tensor(math.log(t), dtype=torch.float64, requires_grad=True)
        bias = torch.tensor(bias_for(t), dtype=torch.float64, requires_grad=True)
        if kind == "softmax":
            loss = loss_mod.ClipLoss()(xt, yt, log_t.exp())
        else:
            loss = loss_mod.SigLipLoss()(xt, yt, log_t.exp(), bias)
        loss.backward()
        ref = float64_reference(kind, x, y, t, bias_for(t))
        theirs = (loss.item(), xt.grad.numpy(), yt.grad.numpy(), log_t.grad.item())
        for name, a, r in zip(("loss", "dx", "dy", "dlog_t"), theirs, ref):
            assert rel_err(a, r) < 1e-12, f"{kind} t={t}: open_clip {name} differs from the float64 reference"
        if kind == "sigmoid":
            assert rel_err(bias.grad.item(), ref[4]) < 1e-12


VARIANTS = [
    ("softmax", "ring", None),
    ("softmax", "ring", 2),
    ("softmax", "allgather", None),
    ("sigmoid", "ring", None),
    ("sigmoid", "ring", 2),
    ("sigmoid", "allgather", None),
]


@pytest.mark.parametrize("mesh_shape", [(8, 1), (2, 4)])
@pytest.mark.parametrize("kind,impl,tile", VARIANTS)
def test_fp32_loss_and_gradients_within_1e5_of_float64(kind, impl, tile, mesh_shape):
    mesh = jax.make_mesh(mesh_shape, AXES, axis_types=(AxisType.Auto,) * 2)
    shard = NamedSharding(mesh, P(AXES, None))

    def loss(x, y, log_t, bias):
        return losses.contrastive_loss(x, y, log_t, bias, kind=kind, mesh=mesh, tile=tile, impl=impl)

    value_and_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    failures = []
    for noise in ALIGNMENTS:
        x, y = embeddings(noise)
        xs, ys = jax.device_put(x, shard), jax.device_put(y, shard)
        for t in TEMPERATURES:
            value, grads = value_and_grads(xs, ys, jnp.float32(math.log(t)), jnp.float32(bias_for(t)))
            ref = float64_reference(kind, x, y, t, bias_for(t))
            names = ("loss", "dx", "dy", "dlog_t", "dbias")[: 5 if kind == "sigmoid" else 4]
            for name, ours, r in zip(names, (value, *grads), ref):
                err = rel_err(ours, r)
                if err > TOL:
                    failures.append(f"noise={noise} t={t} {name}: {err:.1e}")
            if kind == "softmax":
                assert float(grads[3]) == 0.0, "softmax has no bias: its gradient must be exactly zero"
    assert not failures, f"{kind}/{impl}/tile={tile} on {mesh_shape}: " + "; ".join(failures)
