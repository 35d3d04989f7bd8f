"""Which XLA:CPU library runs each of issue 18's 2-D products faster: YNNPACK or Eigen.

    python experiments/cpu_dot_libraries.py                   # all cores
    taskset -c 0 python experiments/cpu_dot_libraries.py      # one core
    python experiments/cpu_dot_libraries.py --shape 8192,128,512

XLA:CPU sends a dot to YNNPACK when its left operand is row-major and contracts its LAST axis, and to Eigen when
the left operand contracts its FIRST axis (xla/backends/cpu/ynn_support.cc, IsDotSupportedByYnn). So every product
of the MLP (rows x width x mlp: forward, input gradient, weight gradient of both layers) can be written either way,
with one operand or the result stored feature-major ([features, rows]) instead. This times both forms of each, on
the same inputs in one process (best of 3 windows), reads which library the compiled HLO really used, and prints
Eigen's time over YNNPACK's. Importing clip_jax first sets its malloc options, so no window pays page faults.

Isolated products are not the train step. On this project's 2-core box YNNPACK won five of the six products alone
(Eigen most of them on one core), yet rewriting the MLP and attention so that each product went to its faster
library alone (feature-major activations, custom VJPs) made the step slower (experiments/results/step_breakdown.md,
third session): XLA runs a layer's input and weight gradients at the same time.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import clip_jax  # noqa: F401  (malloc options, before jax starts)
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def contract(a, b, a_axis, b_axis):
    return lax.dot_general(a, b, (((a_axis,), (b_axis,)), ((), ())))


def products(n, d, f):
    """name -> (operand shapes, a form XLA:CPU gives YNNPACK, a form it gives Eigen). x [n, d] is the MLP input,
    g [n, f] its hidden layer after the activation, dy [n, d] the output gradient, dh [n, f] the hidden layer's
    gradient; a name ending in _t is the same array stored transposed (feature-major)."""
    return {
        "fc1 forward       x w1": (
            {"x": (n, d), "w1": (d, f)},
            lambda a: a["x"] @ a["w1"],
            lambda a: contract(a["w1"], a["x"], 0, 1),  # h^T [f, n]
        ),
        "fc2 forward       g w2": (
            {"g": (n, f), "g_t": (f, n), "w2": (f, d)},
            lambda a: a["g"] @ a["w2"],
            lambda a: contract(a["g_t"], a["w2"], 0, 0),
        ),
        "fc2 input grad    dy w2^T": (
            {"dy": (n, d), "w2": (f, d), "w2_t": (d, f)},
            lambda a: contract(a["dy"], a["w2"], 1, 1),
            lambda a: contract(a["w2_t"], a["dy"], 0, 1),  # dg^T [f, n]
        ),
        "fc2 weight grad   g^T dy": (
            {"g": (n, f), "g_t": (f, n), "dy": (n, d)},
            lambda a: a["g_t"] @ a["dy"],
            lambda a: contract(a["g"], a["dy"], 0, 0),
        ),
        "fc1 input grad    dh w1^T": (
            {"dh": (n, f), "dh_t": (f, n), "w1": (d, f)},
            lambda a: contract(a["dh"], a["w1"], 1, 1),
            lambda a: contract(a["dh_t"], a["w1"], 0, 1),
        ),
        "fc1 weight grad   x^T dh": (
            {"x": (n, d), "dh": (n, f), "dh_t": (f, n)},
            lambda a: lax.optimization_barrier(a["dh_t"] @ a["x"]).T,  # the barrier keeps the product as written
            lambda a: contract(a["x"], a["dh"], 0, 0),
        ),
    }


def best_ms(call, args, windows=3, reps=4):
    jax.block_until_ready(call(args))
    best = float("inf")
    for _ in range(windows):
        t = time.perf_counter()
        for _ in range(reps):
            jax.block_until_ready(call(args))
        best = min(best, (time.perf_counter() - t) / reps * 1e3)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="16640,192,768", help="rows,width,mlp (default: issue 18's image tower)")
    shape = p.parse_args().shape
    try:
        n, d, f = (int(v) for v in shape.split(","))
    except ValueError:
        p.error(f"--shape {shape!r}: give three integers rows,width,mlp, e.g. 16640,192,768")
    if min(n, d, f) < 16:
        p.error(f"--shape {shape!r}: each size must be at least 16 (tiny dots stay out of YNNPACK)")
    rng = np.random.default_rng(0)
    flops = 2 * n * d * f
    print(f"rows {n}, width {d}, mlp {f}; {len(os.sched_getaffinity(0))} core(s); load {os.getloadavg()[0]:.2f}")
    print("| product | YNNPACK form: library, ms (GFLOP/s) | Eigen form: library, ms (GFLOP/s) | Eigen / YNN |")
    print("|---|---|---|---|")
    for name, (shapes, ynn_form, eigen_form) in products(n, d, f).items():
        args = {k: jnp.asarray(rng.standard_normal(s, np.float32)) for k, s in shapes.items()}
        cells = []
        for form in (ynn_form, eigen_form):
            compiled = jax.jit(form).lower(args).compile()
            library = "YNNPACK" if "__ynn" in compiled.as_text() else "Eigen"
            ms = best_ms(compiled, args)
            cells.append((library, ms))
        (lib_a, ms_a), (lib_b, ms_b) = cells
        rate_a, rate_b = flops / ms_a / 1e6, flops / ms_b / 1e6
        ratio = ms_b / ms_a
        print(f"| {name} | {lib_a} {ms_a:.2f} ({rate_a:.0f}) | {lib_b} {ms_b:.2f} ({rate_b:.0f}) | {ratio:.2f} |")


if __name__ == "__main__":
    main()
