import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attrib_core import Status, lissa
from tests.helpers import random_spd


def full_batch(H):
    return lambda generator: (lambda V: V @ H)


@given(st.integers(2, 10), st.floats(1.0, 20.0), st.sampled_from([0.0, 0.001, 0.01]), st.integers(0, 10_000))
def test_full_batch_matches_the_damped_dense_solve(P, cond, damping, seed):
    H = random_spd(P, cond, seed)
    v = torch.randn(3, P, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    scale = 2.0 * cond  # above the largest eigenvalue, as LiSSA needs
    result = lissa(full_batch(H), v, max_steps=3000, scale=scale, damping=damping * scale)
    A = H + damping * scale * torch.eye(P, dtype=torch.float64)
    torch.testing.assert_close(result.x, torch.linalg.solve(A, v.T).T, rtol=1e-6, atol=1e-8)
    assert result.status.tolist() == [Status.CONVERGED] * 3
    assert result.steps.tolist() == [3000] * 3


class Quadratic:
    """H = mean_i (a_i a_iᵀ) + I; a step's operator averages a random mini-batch of the terms."""

    def __init__(self, n=64, dim=6, batch=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.a = torch.randn(n, dim, generator=g, dtype=torch.float64)
        self.batch = batch
        self.H = self.a.T @ self.a / n + torch.eye(dim, dtype=torch.float64)

    def sample_mv(self, generator):
        idx = torch.randint(0, self.a.shape[0], (self.batch,), generator=generator)
        a = self.a[idx]
        return lambda V: (V @ a.T) @ a / self.batch + V


def mean_error(problem, v, *, depth, repeats, seeds=range(6)):
    exact = torch.linalg.solve(problem.H, v.T).T
    errors = [
        (lissa(problem.sample_mv, v, max_steps=depth, scale=20.0, repeats=repeats, seed=s).x - exact).norm()
        for s in seeds
    ]
    return float(torch.stack(errors).mean() / exact.norm())


def test_stochastic_error_shrinks_with_repeats_and_depth():
    problem = Quadratic()
    v = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    shallow = mean_error(problem, v, depth=5, repeats=1)
    deep = mean_error(problem, v, depth=300, repeats=1)
    averaged = mean_error(problem, v, depth=300, repeats=16)
    assert deep < 0.5 * shallow
    assert averaged < 0.6 * deep
    assert averaged < 0.05


def test_same_seed_same_result_and_global_rng_untouched():
    problem = Quadratic()
    v = torch.ones(1, 6, dtype=torch.float64)
    state = torch.get_rng_state()
    first = lissa(problem.sample_mv, v, max_steps=50, scale=20.0, repeats=2, seed=7)
    second = lissa(problem.sample_mv, v, max_steps=50, scale=20.0, repeats=2, seed=7)
    other = lissa(problem.sample_mv, v, max_steps=50, scale=20.0, repeats=2, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first.x, second.x)
    assert not torch.equal(first.x, other.x)


def test_divergence_is_reported_not_raised():
    H = random_spd(4, 10.0, 0)  # largest eigenvalue 10
    v = torch.ones(2, 4, dtype=torch.float64)
    result = lissa(full_batch(H), v, max_steps=60, scale=2.0)
    assert bool((result.status == Status.DIVERGED).all())
    overflow = lissa(full_batch(H), v, max_steps=2000, scale=2.0)
    assert bool((overflow.status == Status.DIVERGED).all()) and not bool(torch.isfinite(overflow.x).all())


def test_single_vector_shape():
    H = random_spd(4, 3.0, 2)
    result = lissa(full_batch(H), torch.ones(4, dtype=torch.float64), max_steps=500, scale=6.0)
    assert result.x.shape == (4,)
    torch.testing.assert_close(result.x, torch.linalg.solve(H, torch.ones(4, dtype=torch.float64)))


def test_bad_input():
    H = random_spd(3, 2.0, 0)
    v = torch.ones(1, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="sample_mv"):
        lissa(H, v)
    with pytest.raises(ValueError, match="scale"):
        lissa(full_batch(H), v, scale=0.0)
    with pytest.raises(ValueError, match="damping"):
        lissa(full_batch(H), v, damping=-0.1)
    with pytest.raises(ValueError, match="repeats"):
        lissa(full_batch(H), v, repeats=0)
    with pytest.raises(ValueError, match="B: contains NaN"):
        lissa(full_batch(H), torch.tensor([[float("nan"), 0.0, 0.0]]))


def test_slow_divergence_is_flagged():
    # One eigenvalue just below zero: the series grows 0.5% a step, never exploding.
    scale = 10.0
    evals = torch.tensor([-0.005 * scale, 1.0, 2.0, 5.0], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    H = (q * evals) @ q.T
    result = lissa(full_batch(H), torch.ones(2, 4, dtype=torch.float64), max_steps=400, scale=scale)
    assert bool((result.status == Status.DIVERGED).all())
    assert bool(torch.isfinite(result.x).all())


def test_status_tells_a_run_cut_short_from_a_settled_one():
    H = random_spd(4, 10.0, 3)  # eigenvalues 1..10; at scale 20 the slowest mode contracts by 0.95 a step
    v = torch.ones(2, 4, dtype=torch.float64)
    assert lissa(full_batch(H), v, max_steps=40, scale=20.0).status.tolist() == [Status.MAX_STEPS] * 2
    assert lissa(full_batch(H), v, max_steps=5, scale=20.0).status.tolist() == [Status.MAX_STEPS] * 2
    done = lissa(full_batch(H), v, max_steps=600, scale=20.0)
    assert done.status.tolist() == [Status.CONVERGED] * 2
    torch.testing.assert_close(done.x, torch.linalg.solve(H, v.T).T, rtol=1e-6, atol=1e-8)


def test_stochastic_convergence_is_not_flagged():
    problem = Quadratic()
    v = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for seed in range(4):
        result = lissa(problem.sample_mv, v, max_steps=400, scale=20.0, seed=seed)
        assert result.status.tolist() == [Status.CONVERGED] * 3  # at the noise floor


def test_sample_mv_must_return_an_operator_and_damping_below_two():
    H = random_spd(3, 2.0, 0)
    with pytest.raises(TypeError, match="sample_mv: must return"):
        lissa(lambda g: H, torch.ones(3, dtype=torch.float64), max_steps=2)
    with pytest.raises(ValueError, match=r"damping: must be < 2 \* scale = 8"):
        lissa(full_batch(H), torch.ones(3, dtype=torch.float64), scale=4.0, damping=8.0)
    single = lissa(full_batch(H), torch.ones(3, dtype=torch.float64), max_steps=3, scale=4.0)
    assert single.status.shape == () and single.steps.shape == () and single.stats["last_update"].shape == ()
