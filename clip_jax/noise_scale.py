"""The gradient noise scale as a training metric (config key `noise_scale`): McCandlish et al. 2018, "An Empirical
Model of Large-Batch Training", arXiv:1812.06162, section 2.2 and appendix A.1.

Definitions (the paper's). For a loss that is a mean over examples, L = E_x[L_x], let G = E_x[grad L_x] be the
true gradient and Sigma = Cov_x[grad L_x] the per-example gradient covariance. A batch of B examples estimates G
with G_B = mean of B per-example gradients, and E|G_B|^2 = |G|^2 + tr(Sigma) / B. The simple noise scale is
B_simple = tr(Sigma) / |G|^2 (examples). Gradients at two batch sizes b < B give unbiased estimates of both terms:

    |G|^2     ~= (B |G_B|^2 - b |G_b|^2) / (B - b)
    tr(Sigma) ~= (|G_b|^2 - |G_B|^2) / (1/b - 1/B)

and B_simple is the ratio of exponential moving averages of the two estimates over steps (a ratio of per-step
values would be biased and heavy-tailed: each estimate alone can be negative).

Which gradients (clip_jax, accum_steps = k >= 2). GradCache (grad_cache.py) pulls the FULL-batch loss's gradient
w.r.t. each row's embeddings back through micro-batch i's towers, so the step's gradient is the sum of k shares,
share_i = sum over the B/k rows r of micro-batch i of J_r^T dL/de_r (e_r: row r's embeddings, and its caption NLL
for CoCa; J_r = de_r/dparams). With g_r = B J_r^T dL/de_r, the step's gradient is G_B = mean_r g_r (all B rows),
and G_b,i = k share_i = mean of g_r over micro-batch i (b = B/k rows). We use |G_b|^2 = the mean over the k
micro-batches of |G_b,i|^2 (each is unbiased; their mean has less variance), and |G_B|^2 of the step's gradient.

What that measures for a contrastive loss. g_r is the per-example term of the full batch's loss: it depends on
the other B-1 examples (the negatives), so it is not the gradient of a b-example loss, and the rows of one batch
are exchangeable but not independent. With m_B = E[g_r] (the expected gradient of the batch-B loss),
S = Cov[g_r] and C = Cov[g_r, g_s] for r != s (the coupling through shared negatives), the estimators' expectations
are |m_B|^2 + tr(C) (logged `grad_sq`) and tr(S) - tr(C) (logged `trace_sigma`): the noise of the per-example
terms beyond what the batch's examples share. For a loss that is a mean of independent per-example losses C = 0
and they are the paper's |G|^2 and tr(Sigma) exactly. Both depend on B for a contrastive loss (more negatives);
compare noise scales measured at the same B.

Two model parameters are left out of every norm: 'log_t' and 'bias' (the temperature and SigLIP bias) are read
once per batch by the loss, so GradCache gives each micro-batch the same 1/k of their gradient and they have no
per-example share. The norms are of the raw gradient (before optim.clip_norm).

accum_steps = 1 is refused (config_checks): the per-device partial gradients exist only inside the all-reduce
XLA inserts, so getting them would mean running the towers' backward under shard_map; and B_small = B / devices
would change with the mesh, while GradCache's shares are global (the same estimate on any mesh).

Cost when on: one sum of squares per micro-batch share and one of the step's gradient (no extra pass); off: the
step's program is unchanged. The moving averages live on the host (step_log.MetricAverager): they restart when a
run resumes.
"""

import math

import jax
import jax.numpy as jnp

# Top-level parameters whose gradient the loss reads once per batch (see above): not part of the noise scale.
BATCH_SCALARS = ("log_t", "bias")
# The aux key grad_cache uses to hand the shares' squared norms ([k] float32) to the train step.
SHARES = "grad_share_sq_norms"


def sq_norm(grads) -> jax.Array:
    """Squared L2 norm (float32 scalar) of a gradient tree (a nested dict, as optim.split gives), leaving out the
    top-level BATCH_SCALARS."""
    if isinstance(grads, dict):
        grads = {k: v for k, v in grads.items() if k not in BATCH_SCALARS}
    leaves = jax.tree.leaves(grads)
    return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves), jnp.zeros((), jnp.float32))


def estimates(share_sq_norms, full_sq_norm, batch_size: int) -> dict:
    """McCandlish et al.'s unbiased estimates (appendix A.1) from one step's gradient split into k shares.

    share_sq_norms: float [k], |share_i|^2, where share_i is micro-batch i's part of the step's gradient (the
      shares sum to it; each covers batch_size / k examples); full_sq_norm: float scalar, |sum of shares|^2;
      batch_size: B, examples in the step.
    Returns float32 scalars {'grad_sq': estimate of |G|^2, 'trace_sigma': estimate of tr(Sigma)} in the loss's
    gradient units squared (trace_sigma per example). Either may be negative on one step. Raises ValueError if
    k < 2 (one batch size gives no estimate).
    """
    share_sq_norms = jnp.asarray(share_sq_norms, jnp.float32)
    k = share_sq_norms.shape[0]
    if k < 2:
        raise ValueError(f"the noise scale needs at least 2 gradient shares per step, got {k}")
    big, small = batch_size, batch_size / k
    g_big = jnp.asarray(full_sq_norm, jnp.float32)
    g_small = k * k * jnp.mean(share_sq_norms)  # |k share_i|^2, the mean over the k micro-batches
    return {
        "grad_sq": (big * g_big - small * g_small) / (big - small),
        "trace_sigma": (g_small - g_big) / (1 / small - 1 / big),
    }


def step_metrics(aux: dict, grads, cfg) -> tuple[dict, dict]:
    """(aux without the shares, the step's noise metrics): {} when cfg.noise_scale is off (nothing is traced)."""
    if not cfg.noise_scale:
        return aux, {}
    aux = dict(aux)
    shares = aux.pop(SHARES)
    return aux, estimates(shares, sq_norm(grads), cfg.batch_size)


class MovingAverage:
    """B_simple = EMA(trace_sigma) / EMA(grad_sq) over steps, on the host (the paper's smoothing).

    decay: weight of the past per step, in [0, 1). Both averages start at 0 with the same weights, so the usual
    start-up correction (division by 1 - decay^t) cancels in the ratio. Steps whose estimates are not finite (a
    NaN/Inf step) are skipped.
    """

    def __init__(self, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"the noise scale's EMA decay must be in [0, 1), got {decay}")
        self.decay, self.grad_sq, self.trace_sigma = decay, 0.0, 0.0

    def update(self, grad_sq: float, trace_sigma: float) -> None:
        if not (math.isfinite(grad_sq) and math.isfinite(trace_sigma)):
            return
        d = self.decay
        self.grad_sq = d * self.grad_sq + (1 - d) * grad_sq
        self.trace_sigma = d * self.trace_sigma + (1 - d) * trace_sigma

    def value(self) -> float:
        """B_simple in examples; NaN until the averaged |G|^2 estimate is positive (before the first step, or while
        the gradient is below what the two batch sizes can tell from noise)."""
        return self.trace_sigma / self.grad_sq if self.grad_sq > 0 else math.nan

    def log(self, steps: list[dict]) -> dict:
        """Update with the per-step metrics of a log interval (in step order); {'noise_scale': B_simple}."""
        for m in steps:
            self.update(float(m["grad_sq"]), float(m["trace_sigma"]))
        return {"noise_scale": self.value()}


def moving_average(cfg) -> MovingAverage | None:
    """The train loop's MovingAverage (decay cfg.noise_scale_decay), or None when cfg.noise_scale is off."""
    return MovingAverage(cfg.noise_scale_decay) if cfg.noise_scale else None
