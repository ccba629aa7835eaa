"""Every solver against a dense ``torch.linalg.solve``, and one sweep of bad input for all of them.

``SOLVERS_UNDER_TEST`` crosses operators (positive definite, indefinite, singular
plus damping; as a matrix and as a callable), dtypes (float32, float64) and
right-hand-side shapes (``(P,)``, ``(k, P)``). Each solver returns one
:class:`attrib_core.Solution`; its ``status`` must say what happened.
"""

import pytest
import torch

from attrib_core import (
    Solution,
    Status,
    arnoldi,
    cg,
    datainf,
    factor_explicit,
    lissa,
    nystrom,
    solve_explicit,
    spectral_projector,
)

P, K = 8, 3


def spectrum(kind):
    if kind == "spd":
        return torch.linspace(1.0, 10.0, P, dtype=torch.float64), 0.0
    if kind == "indefinite":
        return torch.cat([-torch.linspace(1.0, 3.0, 3, dtype=torch.float64),
                          torch.linspace(1.0, 10.0, P - 3, dtype=torch.float64)]), 0.0
    # one zero eigenvalue (a Krylov space holds one direction of a repeated eigenvalue: Arnoldi's
    # projector would be low-rank by construction)
    return torch.cat([torch.zeros(1, dtype=torch.float64), torch.linspace(1.0, 10.0, P - 1, dtype=torch.float64)]), 0.5


def operator(kind, dtype):
    evals, damping = spectrum(kind)
    q, _ = torch.linalg.qr(torch.randn(P, P, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    A = (q * evals) @ q.T
    return ((A + A.T) / 2).to(dtype), evals, q, damping


def as_form(A, form):
    return A if form == "matrix" else (lambda V: V @ A.to(V.dtype))


def _dense(A):
    return A if isinstance(A, torch.Tensor) else A(torch.eye(P, dtype=torch.float64))


# name -> (solve(A, B, damping, dtype) -> Solution, the operator kinds it takes)
SOLVERS_UNDER_TEST = {
    "solve_explicit": (lambda A, B, d, dt: solve_explicit(_dense(A).to(dt), B, damping=d), "all"),
    "factor_explicit": (lambda A, B, d, dt: factor_explicit(_dense(A).to(dt), damping=d).solve(B), "all"),
    "cg": (lambda A, B, d, dt: cg(A, B, damping=d, tol=1e-10 if dt == torch.float64 else 1e-5, max_steps=50), "all"),
    "lissa": (lambda A, B, d, dt: lissa(lambda g: as_operator(A), B, damping=d, scale=12.0, max_steps=1500), "all"),
    "nystrom": (lambda A, B, d, dt: nystrom(A, P, rank=P, dtype=dt).solve(B, damping=d), "psd"),
    "spectral": (lambda A, B, d, dt: spectral_projector(
        *arnoldi(A, P, max_steps=P, top_k=P, dtype=dt)[:2], damping=d, rcond=0.0).solve(B), "all"),
    "datainf (one example)": (None, "rank one"),  # exact only for one gradient: its own sweep below
}


def as_operator(A):
    return A if callable(A) else (lambda V: V @ A.to(V.dtype))


def oracle(kind, A, B, damping):
    shifted = _dense(A).double() + damping * torch.eye(P, dtype=torch.float64)
    return torch.linalg.solve(shifted, B.double().reshape(-1, P).T).T.reshape(B.shape)


def positive_part(evals, q, B, damping):
    """The spectral projector's answer on an indefinite operator: the inverse on the positive eigenpairs."""
    keep = evals + damping > 0
    U = q[:, keep]
    return ((B.double().reshape(-1, P) @ U) / (evals[keep] + damping)) @ U.T


@pytest.mark.parametrize("shape", ["vector", "block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("form", ["matrix", "callable"])
@pytest.mark.parametrize("kind", ["spd", "indefinite", "singular"])
@pytest.mark.parametrize("name", [n for n, (s, _) in SOLVERS_UNDER_TEST.items() if s is not None])
def test_every_solver_against_a_dense_solve(name, kind, form, dtype, shape):
    solve, takes = SOLVERS_UNDER_TEST[name]
    A, evals, q, damping = operator(kind, dtype)
    B = torch.randn(K, P, generator=torch.Generator().manual_seed(1), dtype=dtype)
    if shape == "vector":
        B = B[0]
    rows = () if shape == "vector" else (K,)
    if kind == "indefinite" and takes == "psd":
        with pytest.raises(ValueError, match="not positive semi-definite"):
            solve(as_form(A, form), B, damping, dtype)
        return
    result = solve(as_form(A, form), B, damping, dtype)
    assert isinstance(result, Solution)
    assert result.x.shape == B.shape and result.status.shape == rows and result.steps.shape == rows
    assert result.status.dtype == torch.long and result.steps.dtype == torch.long
    status = set(result.status.reshape(-1).tolist())
    tol = {"rtol": 1e-6, "atol": 1e-8} if dtype == torch.float64 else {"rtol": 2e-3, "atol": 2e-4}
    if kind != "indefinite":
        assert status == {Status.CONVERGED}, (name, result.status, result.stats)
        torch.testing.assert_close(result.x.double(), oracle(kind, A, B, damping), **tol)
        return
    if name in ("solve_explicit", "factor_explicit"):
        assert status == {Status.INDEFINITE}  # the damped system solved exactly, and said to be indefinite
        torch.testing.assert_close(result.x.double(), oracle(kind, A, B, damping), **tol)
    elif name == "cg":  # each row: negative curvature met (said), or converged to the right answer
        expected = oracle(kind, A, B, damping).reshape(-1, P)
        for row, want, code in zip(result.x.reshape(-1, P), expected, result.status.reshape(-1).tolist()):
            assert code in (Status.INDEFINITE, Status.CONVERGED)
            if code == Status.CONVERGED:
                torch.testing.assert_close(row.double(), want, **tol)
        assert Status.INDEFINITE in status
    elif name == "lissa":
        assert status == {Status.DIVERGED}  # a negative eigenvalue makes the series grow
    else:  # spectral: the inverse on the positive eigenpairs, and said to be indefinite
        assert status == {Status.INDEFINITE} and result.stats["n_negative"] == 3
        torch.testing.assert_close(result.x.double().reshape(-1, P), positive_part(evals, q, B, damping), **tol)


def test_datainf_is_exact_for_one_gradient_and_returns_the_one_solution():
    g = torch.randn(1, P, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    B = torch.randn(K, P, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    result = datainf([g], [B], damping=0.3)
    assert isinstance(result, Solution) and result.status.tolist() == [Status.CONVERGED] * K
    expected = torch.linalg.solve(g.T @ g + 0.3 * torch.eye(P, dtype=torch.float64), B.T).T
    torch.testing.assert_close(result.x[0], expected)


def _fitted():
    A, *_ = operator("spd", torch.float64)
    r = arnoldi(A, P, max_steps=P, top_k=P)
    return A, {
        "solve_explicit": lambda B, **kw: solve_explicit(A, B, **kw),
        "factor_explicit": lambda B, **kw: factor_explicit(A, **kw).solve(B),
        "cg": lambda B, **kw: cg(A, B, **kw),
        "lissa": lambda B, **kw: lissa(lambda g: as_operator(A), B, scale=12.0, **kw),
        "nystrom": lambda B, **kw: nystrom(A, P, rank=P).solve(B, **{"damping": 0.0, **kw}),
        "spectral": lambda B, **kw: spectral_projector(r.eigenvalues, r.eigenvectors, **kw).solve(B),
        "datainf": lambda B, **kw: datainf([A[:2]], [B], **{"damping": 0.1, **kw}),
    }


# mistake -> (keyword overrides, or a replacement B; the error type; the argument named)
MISTAKES = {
    "B not a tensor": ({"B": [[1.0] * P]}, TypeError, "B"),
    "B of another width": ({"B": torch.ones(2, P + 1, dtype=torch.float64)}, ValueError, "B"),
    "B of three dimensions": ({"B": torch.ones(1, 2, P, dtype=torch.float64)}, ValueError, "B"),
    "B with NaN": ({"B": torch.full((2, P), float("nan"), dtype=torch.float64)}, ValueError, "B"),
    "negative damping": ({"damping": -1.0}, ValueError, "damping"),
    "damping not a number": ({"damping": "0.1"}, TypeError, "damping"),
    "fractional max_steps": ({"max_steps": 2.5}, TypeError, "max_steps"),
    "zero max_steps": ({"max_steps": 0}, ValueError, "max_steps"),
}
TAKES_MAX_STEPS = {"cg", "lissa"}


@pytest.mark.parametrize("mistake", list(MISTAKES))
@pytest.mark.parametrize("name", list(_fitted()[1]))
def test_bad_input_gets_one_error_type_per_mistake_naming_the_argument(name, mistake):
    _, solvers = _fitted()
    overrides, error, argument = MISTAKES[mistake]
    if "max_steps" in overrides and name not in TAKES_MAX_STEPS:
        pytest.skip(f"{name} takes no max_steps")
    if mistake == "B of another width" and name == "lissa":
        pytest.skip("lissa's operator is a callable: B alone says what P is")
    kwargs = dict(overrides)
    B = kwargs.pop("B", torch.ones(2, P, dtype=torch.float64))
    with pytest.raises(error, match=rf"{argument}(\[[^]]*\])?:"):
        solvers[name](B, **kwargs)


def test_arnoldi_takes_max_steps_as_every_iterative_solver_does():
    A, _ = _fitted()
    with pytest.raises(TypeError, match="max_steps:"):
        arnoldi(A, P, max_steps=2.5, top_k=2)
    with pytest.raises(ValueError, match="max_steps:"):
        arnoldi(A, P, max_steps=1, top_k=2)
