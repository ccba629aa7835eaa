"""Timing of the functional core against plain-torch baselines, side by side in one run.

Setting: the benchmark's ``mlp`` and ``cnn`` settings (:mod:`benchmarks.settings`):
scikit-learn digits, an MLP 64-128-10 (9,610 parameters) and a small CNN (3,130
parameters) fitted on 1,000 training images, 100 test images, float32.

    python -m benchmarks.core [--part gradients,solvers] [--repeats 5]

``gradients``: per-sample gradients, the dense Hessian, the explicit solve, CG,
each against the way it is written with plain ``torch.autograd``. ``solvers``:
EK-FAC fit and solve (MLP and CNN) with the agreement of its influence scores
with the explicit Hessian's, Arnoldi with 100 eigenpairs, and CG's steps to
tolerance with each preconditioner.

Every timing is the median of ``--repeats`` runs after one warm-up run (the first
``torch.func`` call pays about a second of set-up), except the long ones marked
``(1 run)``, which are timed once after a small warm-up. Baselines that would
take minutes are timed on a slice and scaled up linearly; the table says where.
"""

from __future__ import annotations

import argparse
import platform
from typing import NamedTuple, Optional

import torch

from attrib_core import (
    arnoldi,
    cg,
    ekfac,
    hessian,
    jacobi,
    make_hvp,
    nystrom,
    per_sample_grad,
    ravel,
    select,
    solve_explicit,
)

from .measure import pearson, timed
from .settings import Setting, make_setting

DAMPING = 1e-3
CG_STEPS = 20
N_TEST = 100
LABELS = {"mlp": "MLP 64-128-10", "cnn": "CNN"}  # the benchmark settings timed here, as the tables name them


class Row(NamedTuple):
    name: str
    ours: float
    baseline: Optional[float] = None
    what: str = ""
    scaled: bool = False
    note: str = ""


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


def gradient_rows(s: Setting, args) -> list[Row]:
    P = ravel(s.params)[0].numel()
    rows = []
    t_ours, g_ours = timed(lambda: per_sample_grad(s.loss)(s.params, s.train_batch), args.repeats)
    t_base, g_base = timed(lambda: autograd_per_sample(s.loss, s.params, *s.train_batch), args.repeats)
    torch.testing.assert_close(g_ours, g_base, rtol=1e-4, atol=1e-6)
    rows.append(Row("per-sample gradients, 1,000 examples", t_ours, t_base, "autograd loop"))

    make_hvp(s.objective, s.params, s.train_batch)(torch.zeros(2, P))  # warm-up of torch.func
    t_hess, H = timed(lambda: hessian(s.objective, s.params, s.train_batch), warmup=False)
    k = min(args.baseline_rows, P)
    autograd_hessian_rows(s.objective, s.params, s.train_batch, 2)
    t_rows, H_rows = timed(lambda: autograd_hessian_rows(s.objective, s.params, s.train_batch, k), warmup=False)
    torch.testing.assert_close(H[:k], H_rows, rtol=1e-3, atol=1e-5)
    rows.append(Row(f"Hessian {P}x{P} (1 run)", t_hess, t_rows * P / k, f"double-backward rows ({k} timed)", k < P))

    g_test = per_sample_grad(s.loss)(s.params, s.test_batch)
    t_solve, solution = timed(lambda: solve_explicit(H, g_test, damping=DAMPING), warmup=False)
    rows.append(Row(f"solve for {N_TEST} test gradients ({solution.stats['method']}, 1 run)", t_solve))
    rows.append(Row("explicit influence: Hessian + solve", t_hess + t_solve, note="target < 30 s"))

    def ours_cg():
        return cg(make_hvp(s.objective, s.params, s.train_batch), g_test, damping=DAMPING, tol=0.0, max_steps=CG_STEPS)

    t_cg, _ = timed(ours_cg, args.repeats)
    m = min(args.baseline_rhs, N_TEST)
    t_cg_base, _ = timed(lambda: autograd_cg(s.objective, s.params, s.train_batch, g_test[:m], CG_STEPS), args.repeats)
    # The same recurrence; on this Hessian (condition ~1e3, many near-zero eigenvalues)
    # rounding differences grow ~100x a step, to ~1e-3 by step 20 even in float64, so
    # the two are compared after 5 steps, where they agree to rounding.
    five = cg(make_hvp(s.objective, s.params, s.train_batch), g_test[:m], damping=DAMPING, tol=0.0, max_steps=5).x
    five_base = autograd_cg(s.objective, s.params, s.train_batch, g_test[:m], 5)
    assert float((five - five_base).norm() / five_base.norm()) < 1e-4
    rows.append(Row(f"CG, {N_TEST} right-hand sides x {CG_STEPS} steps", t_cg, t_cg_base * N_TEST / m,
                    f"one RHS at a time ({m} timed)", m < N_TEST))
    t_fwd, _ = timed(lambda: make_hvp(s.objective, s.params, s.train_batch, mode="rev-fwd")(g_test), args.repeats)
    t_rev, _ = timed(lambda: make_hvp(s.objective, s.params, s.train_batch, mode="rev-rev")(g_test), args.repeats)
    rows.append(Row(f"HVP block of {N_TEST}, rev-rev (vs rev-fwd)", t_rev, t_fwd, "rev-fwd mode"))
    return rows


def ekfac_rows(s: Setting, args) -> list[Row]:
    """EK-FAC fit and solve, and how well its influence scores agree with the explicit Hessian's."""
    x, y = s.train_batch
    batches = [(x[i : i + 250], y[i : i + 250]) for i in range(0, len(y), 250)]
    fit_ekfac = lambda: ekfac(s.model, s.loss, s.params, batches)  # noqa: E731
    t_fit, approx = timed(fit_ekfac, args.repeats)
    covered = select(s.params, list(approx.names))
    others = {k: v for k, v in s.params.items() if k not in covered}
    restricted = lambda sub, b: s.loss({**others, **sub}, b)  # noqa: E731
    g_train = per_sample_grad(restricted)(covered, s.train_batch)
    g_test = per_sample_grad(restricted)(covered, s.test_batch)
    t_solve, x = timed(lambda: approx.solve(g_test, damping=DAMPING).x, args.repeats)
    H = hessian(lambda p, b: s.objective({**others, **p}, b), covered, s.train_batch)
    exact = g_train @ solve_explicit(H, g_test, damping=DAMPING).x.T
    agreement = pearson(g_train @ x.T, exact)
    P = approx.dim
    return [
        Row(f"{LABELS[s.name]}: EK-FAC fit, {len(approx.layers)} layers, P = {P} (2 passes)", t_fit),
        Row(f"{LABELS[s.name]}: EK-FAC solve for {N_TEST} test gradients", t_solve,
            note=f"scores vs explicit Hessian: Pearson {agreement:.3f}"),
    ]


def arnoldi_rows(s: Setting, args) -> list[Row]:
    P = ravel(s.params)[0].numel()
    mv = make_hvp(s.objective, s.params, s.train_batch)
    mv(torch.zeros(1, P))
    t, result = timed(lambda: arnoldi(mv, P, max_steps=200, top_k=100, seed=0), warmup=False)
    return [Row(f"{LABELS[s.name]}: Arnoldi, 100 eigenpairs from 200 HVPs (1 run)", t,
                note=f"largest residual relative to the largest eigenvalue {float(result.residuals.max() / result.eigenvalues.abs().max()):.1e}")]


def preconditioner_rows(s: Setting, args) -> list[Row]:
    """CG steps to rtol 1e-4 on (H + λI) x = g for 10 test gradients, with each preconditioner."""
    P = ravel(s.params)[0].numel()
    mv = make_hvp(s.objective, s.params, s.train_batch)
    g_test = per_sample_grad(s.loss)(s.params, s.test_batch)[:10]
    H = hessian(s.objective, s.params, s.train_batch)
    builders = {
        "none": lambda: None,
        "Jacobi (exact diagonal)": lambda: jacobi(torch.diagonal(H).clamp(min=0), damping=DAMPING),
        "Nyström, rank 100": lambda: nystrom(
            make_hvp(s.objective, s.params, s.train_batch, damping=DAMPING), P, rank=100, dtype=torch.float32
        ).preconditioner(damping=0.0),
        "EK-FAC": lambda: ekfac(s.model, s.loss, s.params, [s.train_batch]).preconditioner(damping=DAMPING),
    }
    rows = []
    for name, build in builders.items():
        t_build, pre = timed(build, warmup=False)
        t_solve, result = timed(
            lambda: cg(mv, g_test, tol=1e-4, damping=DAMPING, max_steps=1000, preconditioner=pre), warmup=False
        )
        steps = int(result.steps.max())
        status = "all converged" if bool(result.converged.all()) else f"{int(result.converged.sum())}/10 converged"
        rows.append(Row(f"{LABELS[s.name]}: CG to rtol 1e-4, preconditioner {name}", t_solve,
                        note=f"{steps} steps (max of 10), {status}; build {t_build:.2f} s"))
    return rows


def print_table(title: str, rows: list[Row]) -> None:
    print(f"\n{title}\n")
    print("| operation | ours (s) | baseline (s) | baseline | speed-up | notes |")
    print("|---|---:|---:|---|---:|---|")
    for r in rows:
        base = "" if r.baseline is None else f"{r.baseline:.2f}{' *' if r.scaled else ''}"
        ratio = "" if r.baseline is None else f"{r.baseline / r.ours:.1f}x"
        print(f"| {r.name} | {r.ours:.2f} | {base} | {r.what} | {ratio} | {r.note} |")
    if any(r.scaled for r in rows):
        print("\n* scaled linearly from the timed slice to the full size")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", default="gradients,solvers", help="comma-separated: gradients, solvers")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per operation (median)")
    parser.add_argument("--baseline-rows", type=int, default=200, help="Hessian rows the baseline computes")
    parser.add_argument("--baseline-rhs", type=int, default=10, help="right-hand sides the CG baseline solves")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    parts = set(args.part.split(","))
    unknown = parts - {"gradients", "solvers"}
    if unknown:
        parser.error(f"--part: unknown {sorted(unknown)}")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, float32")
    # The benchmark's mlp and cnn settings (float32, L2 1e-3, L-BFGS for 300 iterations), without TracIn's checkpoints.
    net = make_setting("mlp", n_test=N_TEST, seed=args.seed, checkpoints=False)
    if "gradients" in parts:
        print_table("Gradients, Hessian and solves (MLP 64-128-10, P = 9,610)", gradient_rows(net, args))
    if "solvers" in parts:
        conv = make_setting("cnn", n_test=N_TEST, seed=args.seed, checkpoints=False)
        rows = ekfac_rows(net, args) + ekfac_rows(conv, args) + arnoldi_rows(net, args)
        rows += preconditioner_rows(net, args)
        print_table("Spectral and Kronecker-factored solvers", rows)


if __name__ == "__main__":
    main()
