"""Timing of the functional core against plain-torch baselines, side by side in one run.

Setting: scikit-learn digits, an MLP 64-128-10 (9,610 parameters) fitted on
1,000 training images, 100 test images. Each row times one of ours against the
way it is written with plain ``torch.autograd``, and prints the ratio.

    python -m benchmarks.core [--baseline-rows 200] [--baseline-rhs 10]

Baselines that would take minutes are timed on a slice (``--baseline-rows`` rows
of the Hessian, ``--baseline-rhs`` right-hand sides of CG) and scaled up linearly
to the full size; the table says where.
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Callable

import torch

from attrib_core import cg, hessian, make_hvp, per_sample_grad, ravel, solve_explicit

from .digits import cross_entropy, fit, l2_objective, load_digits_split, mlp

L2 = 1e-3
DAMPING = 1e-3
CG_STEPS = 20
N_TEST = 100


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def autograd_per_sample(loss, params, x, y):
    rows = []
    live = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    for i in range(len(y)):
        grads = torch.autograd.grad(loss(live, (x[i : i + 1], y[i : i + 1])), list(live.values()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def autograd_gradient_graph(objective, params, batch):
    """The gradient with its graph kept, so Hessian-vector products reuse it (the efficient plain way)."""
    flat, unravel = ravel(params)
    theta = flat.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(unravel(theta), batch), theta, create_graph=True)
    return theta, grad


def autograd_hessian_rows(objective, params, batch, rows):
    theta, grad = autograd_gradient_graph(objective, params, batch)
    return torch.stack([torch.autograd.grad(grad[i], theta, retain_graph=True)[0] for i in range(rows)])


def autograd_cg(objective, params, batch, B, steps):
    """One right-hand side at a time, one double-backward HVP per step: the plain-torch CG."""
    theta, grad = autograd_gradient_graph(objective, params, batch)

    def mv(v):
        return torch.autograd.grad(grad, theta, grad_outputs=v, retain_graph=True)[0] + DAMPING * v

    out = []
    for b in B:
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rho = r @ r
        for _ in range(steps):
            q = mv(p)
            alpha = rho / (p @ q)
            x = x + alpha * p
            r = r - alpha * q
            rho_new = r @ r
            p = r + (rho_new / rho) * p
            rho = rho_new
        out.append(x)
    return torch.stack(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline-rows", type=int, default=200, help="Hessian rows the baseline computes")
    parser.add_argument("--baseline-rhs", type=int, default=10, help="right-hand sides the CG baseline solves")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    split = load_digits_split(1000, seed=args.seed, dtype=torch.float32)
    model = mlp(128, seed=args.seed, dtype=torch.float32)
    params = fit(model, split.x_train, split.y_train, l2=L2, max_iter=300)
    loss, objective = cross_entropy(model), l2_objective(model, L2)
    train = (split.x_train, split.y_train)
    test = (split.x_test[:N_TEST], split.y_test[:N_TEST])
    P = ravel(params)[0].numel()
    rows = []

    t_ours, g_ours = timed(lambda: per_sample_grad(loss)(params, train))
    t_base, g_base = timed(lambda: autograd_per_sample(loss, params, *train))
    torch.testing.assert_close(g_ours, g_base, rtol=1e-4, atol=1e-6)
    rows.append(("per-sample gradients, 1,000 examples", t_ours, t_base, "autograd loop", False))

    t_hess, H = timed(lambda: hessian(objective, params, train))
    k = min(args.baseline_rows, P)
    t_rows, H_rows = timed(lambda: autograd_hessian_rows(objective, params, train, k))
    torch.testing.assert_close(H[:k], H_rows, rtol=1e-3, atol=1e-5)
    rows.append((f"Hessian {P}x{P}", t_hess, t_rows * P / k, f"double-backward rows ({k} timed)", k < P))

    g_test = per_sample_grad(loss)(params, test)
    t_solve, solution = timed(lambda: solve_explicit(H, g_test, damping=DAMPING))
    rows.append((f"solve for {N_TEST} test gradients ({solution.method})", t_solve, None, "", False))
    rows.append(("explicit influence: Hessian + solve", t_hess + t_solve, None, "", False))

    def ours_cg():
        return cg(make_hvp(objective, params, train), g_test, damping=DAMPING, tol=0.0, max_iter=CG_STEPS)

    t_cg, solved = timed(ours_cg)
    m = min(args.baseline_rhs, N_TEST)
    t_cg_base, _ = timed(lambda: autograd_cg(objective, params, train, g_test[:m], CG_STEPS))
    # Both are the same recurrence, but on this Hessian (cond ~1e3, many near-zero
    # eigenvalues) rounding differences grow ~100x a step, to ~1e-3 by step 20 even in
    # float64; so the two are compared after 5 steps, where they agree to rounding.
    five = cg(make_hvp(objective, params, train), g_test[:m], damping=DAMPING, tol=0.0, max_iter=5).x
    five_base = autograd_cg(objective, params, train, g_test[:m], 5)
    assert float((five - five_base).norm() / five_base.norm()) < 1e-4
    rows.append(
        (f"CG, {N_TEST} right-hand sides x {CG_STEPS} steps", t_cg, t_cg_base * N_TEST / m,
         f"one RHS at a time ({m} timed)", m < N_TEST)
    )
    t_fwd, _ = timed(lambda: make_hvp(objective, params, train, mode="rev-fwd")(g_test))
    t_rev, _ = timed(lambda: make_hvp(objective, params, train, mode="rev-rev")(g_test))
    rows.append((f"HVP block of {N_TEST}, rev-rev (vs rev-fwd)", t_rev, t_fwd, "rev-fwd mode", False))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"MLP 64-128-10, P = {P}, 1,000 training images, float32\n")
    print("| operation | ours (s) | baseline (s) | baseline | speed-up |")
    print("|---|---:|---:|---|---:|")
    for name, ours, base, what, scaled in rows:
        base_s = "" if base is None else f"{base:.2f}{' *' if scaled else ''}"
        ratio = "" if base is None else f"{base / ours:.1f}x"
        print(f"| {name} | {ours:.2f} | {base_s} | {what} | {ratio} |")
    if any(r[4] for r in rows):
        print("\n* scaled linearly from the timed slice to the full size")


if __name__ == "__main__":
    main()
