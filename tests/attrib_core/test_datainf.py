import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attrib_core import Status, datainf, datainf_damping


def formula(g: torch.Tensor, v: torch.Tensor, lam: float) -> torch.Tensor:
    """DataInf written out as in the paper, one training example at a time."""
    n = g.shape[0]
    out = torch.zeros_like(v)
    for i in range(n):
        gi = g[i]
        out += (v - torch.outer(v @ gi, gi) / (lam + gi @ gi)) / (n * lam)
    return out


layers = st.lists(st.integers(1, 12), min_size=1, max_size=3)


@given(layers, st.integers(1, 20), st.integers(1, 4), st.integers(0, 10_000), st.sampled_from([None, 0.3]))
def test_equals_the_formula_layer_by_layer(widths, n, k, seed, damping):
    g = torch.Generator().manual_seed(seed)
    grads = {f"layer{i}": torch.randn(n, w, generator=g, dtype=torch.float64) for i, w in enumerate(widths)}
    V = {name: torch.randn(k, t.shape[1], generator=g, dtype=torch.float64) for name, t in grads.items()}
    result = datainf(grads, V, damping=damping)
    for name, t in grads.items():
        # The paper's heuristic: 0.1 x the mean eigenvalue of the layer's Fisher, tr(G)/d.
        lam = 0.1 * (t**2).sum() / (n * t.shape[1]) if damping is None else damping
        torch.testing.assert_close(result.stats["damping"][name], torch.as_tensor(lam, dtype=torch.float64))
        torch.testing.assert_close(result.x[name], formula(t, V[name], float(lam)), rtol=1e-10, atol=1e-12)


def test_one_example_is_exact_by_sherman_morrison():
    g = torch.randn(1, 6, dtype=torch.float64)
    v = torch.randn(2, 6, dtype=torch.float64)
    lam = 0.7
    exact = torch.linalg.solve(g.T @ g + lam * torch.eye(6, dtype=torch.float64), v.T).T
    torch.testing.assert_close(datainf([g], [v], damping=lam).x[0], exact)


def test_lists_per_layer_damping_and_vectors():
    grads = [torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)]
    V = [torch.randn(3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)]
    result = datainf(grads, V, damping=[0.5, 2.0])
    assert result.x[0].shape == (3,) and result.x[1].shape == (2,)
    assert result.status.shape == () and int(result.status) == Status.CONVERGED
    torch.testing.assert_close(result.x[0], formula(grads[0], V[0][None], 0.5)[0])
    torch.testing.assert_close(result.x[1], formula(grads[1], V[1][None], 2.0)[0])
    blocks = datainf(grads, [torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)])
    assert blocks.status.tolist() == [Status.CONVERGED] * 4
    with pytest.raises(ValueError, match="B: every layer needs the same right-hand sides"):
        datainf(grads, [V[0], torch.randn(4, 2, dtype=torch.float64)])
    heuristic = datainf_damping(grads)
    torch.testing.assert_close(heuristic[1], 0.1 * grads[1].pow(2).mean())


def test_bad_input():
    grads = {"a": torch.ones(3, 2)}
    V = {"a": torch.ones(1, 2)}
    with pytest.raises(ValueError, match="divides"):
        datainf(grads, V, damping=0)
    with pytest.raises(ValueError, match="divides"):
        datainf(grads, V, damping={"a": -1.0})
    with pytest.raises(ValueError, match="heuristic gives 0"):
        datainf({"a": torch.zeros(3, 2)}, V)
    with pytest.raises(ValueError, match="layers"):
        datainf(grads, {"b": torch.ones(1, 2)})
    with pytest.raises(ValueError, match="width"):
        datainf(grads, {"a": torch.ones(1, 3)})
    with pytest.raises(ValueError, match="NaN"):
        datainf({"a": torch.tensor([[1.0, float("nan")]])}, V)
    with pytest.raises(ValueError, match="one per layer"):
        datainf(grads, V, damping=[1.0, 2.0])


def test_half_precision_gradients_are_computed_in_float32():
    g = (torch.randn(8, 2000, generator=torch.Generator().manual_seed(0)) * 10).half()
    v = torch.randn(2, 2000, generator=torch.Generator().manual_seed(1)).half()
    result = datainf([g], [v])
    lam = float(result.stats["damping"][0])
    assert 0 < lam < float("inf")
    expected = formula(g.double(), v.double(), lam)
    assert float((result.x[0].double() - expected).norm() / expected.norm()) < 1e-3
    with pytest.raises(ValueError, match="finite"):
        datainf([g], [v], damping=float("inf"))
