"""Influence of training points for L2-regularised logistic regression, against its closed form.

The model is real: scikit-learn's breast-cancer data, standardised. The oracle
is written in NumPy from the formulas, independently of the library:
``influence[i, j] = g_iᵀ H⁻¹ g_j`` with ``g = (p - y) z`` and
``H = Zᵀ diag(p (1 - p)) Z / n + λ I``; and, for the first-order claim itself,
actual leave-one-out retraining.
"""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from torch.nn.functional import binary_cross_entropy_with_logits

from attrib_core import Status, cg, hessian, lissa, make_hvp, per_sample_grad, solve_explicit

LAMBDA = 0.05
N_TRAIN, N_TEST = 150, 20


def sigmoid(t):
    return 1.0 / (1.0 + np.exp(-t))


def newton_fit(Z, y, weights, theta0=None):
    """Minimise sum_i weights_i * bce_i / n + λ/2 |θ|² by Newton's method (n = len(y) always)."""
    n, d = Z.shape
    theta = np.zeros(d) if theta0 is None else theta0.copy()
    for _ in range(50):
        p = sigmoid(Z @ theta)
        grad = Z.T @ (weights * (p - y)) / n + LAMBDA * theta
        H = (Z * (weights * p * (1 - p))[:, None]).T @ Z / n + LAMBDA * np.eye(d)
        step = np.linalg.solve(H, grad)
        theta -= step
        if np.abs(step).max() < 1e-13:
            break
    return theta


def mean_bce(Z, y, theta):
    p = sigmoid(Z @ theta)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


@pytest.fixture(scope="module")
def problem():
    data = load_breast_cancer()
    X = (data.data - data.data.mean(0)) / data.data.std(0)
    order = np.random.default_rng(0).permutation(len(X))
    train, test = order[:N_TRAIN], order[N_TRAIN : N_TRAIN + N_TEST]
    Z = np.hstack([X, np.ones((len(X), 1))])
    theta = newton_fit(Z[train], data.target[train], np.ones(N_TRAIN))
    return Z[train], data.target[train].astype(float), Z[test], data.target[test].astype(float), theta


def closed_form_influence(Ztr, ytr, Zte, yte, theta):
    p_tr, p_te = sigmoid(Ztr @ theta), sigmoid(Zte @ theta)
    H = (Ztr * (p_tr * (1 - p_tr))[:, None]).T @ Ztr / len(ytr) + LAMBDA * np.eye(Ztr.shape[1])
    g_tr = (p_tr - ytr)[:, None] * Ztr
    g_te = (p_te - yte)[:, None] * Zte
    return g_tr @ np.linalg.solve(H, g_te.T)  # (n_train, n_test)


def library_pieces(Ztr, ytr, Zte, yte, theta):
    params = {"w": torch.tensor(theta[:-1]), "b": torch.tensor(theta[-1])}

    def loss(p, batch):
        x, y = batch
        return binary_cross_entropy_with_logits(x @ p["w"] + p["b"], y)

    def objective(p, batch):
        return loss(p, batch) + LAMBDA / 2 * (p["w"].pow(2).sum() + p["b"].pow(2))

    train = (torch.tensor(Ztr[:, :-1]), torch.tensor(ytr))
    test = (torch.tensor(Zte[:, :-1]), torch.tensor(yte))
    g_train = per_sample_grad(loss)(params, train)
    g_test = per_sample_grad(loss)(params, test)
    return params, objective, train, g_train, g_test


def test_explicit_cg_and_lissa_influence_equal_closed_form(problem):
    expected = closed_form_influence(*problem)
    params, objective, train, g_train, g_test = library_pieces(*problem)

    H = hessian(objective, params, train)
    explicit = g_train @ solve_explicit(H, g_test).x.T
    np.testing.assert_allclose(explicit.numpy(), expected, rtol=1e-8, atol=1e-10)

    solved = cg(make_hvp(objective, params, train), g_test, tol=1e-12)
    assert bool(solved.converged.all())
    np.testing.assert_allclose((g_train @ solved.x.T).numpy(), expected, rtol=1e-6, atol=1e-8)

    lam_max = float(torch.linalg.eigvalsh(H).max())
    neumann = lissa(lambda g: (lambda V: V @ H), g_test, max_steps=4000, scale=1.5 * lam_max)
    assert neumann.status.tolist() == [Status.CONVERGED] * len(g_test)
    np.testing.assert_allclose((g_train @ neumann.x.T).numpy(), expected, rtol=1e-4, atol=1e-6)


def test_influence_predicts_leave_one_out_retraining(problem):
    Ztr, ytr, Zte, yte, theta = problem
    influence = closed_form_influence(*problem)
    params, objective, train, g_train, g_test = library_pieces(*problem)
    ours = (g_train @ solve_explicit(hessian(objective, params, train), g_test).x.T).numpy()
    np.testing.assert_allclose(ours, influence, rtol=1e-8, atol=1e-10)
    j = 0
    base = mean_bce(Zte[j : j + 1], yte[j : j + 1], theta)
    actual = []
    for i in range(N_TRAIN):
        weights = np.ones(N_TRAIN)
        weights[i] = 0.0
        theta_i = newton_fit(Ztr, ytr, weights, theta0=theta)
        actual.append(mean_bce(Zte[j : j + 1], yte[j : j + 1], theta_i) - base)
    predicted = ours[:, j] / N_TRAIN  # removing i raises the test loss by about this much
    # First order, so not exact: 0.985 measured here; a wrong sign or Hessian gives far less.
    assert np.corrcoef(predicted, actual)[0, 1] > 0.97
    # A positive score marks a helpful training point: removing it raises the test loss.
    top = int(np.argmax(ours[:, j]))
    assert actual[top] > 0
