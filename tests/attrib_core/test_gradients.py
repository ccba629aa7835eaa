import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from attrib_core import per_sample_grad, per_sample_grad_loop, ravel
from tests.helpers import classification_batch, cross_entropy_loss, params_of, small_mlp


def autograd_loop(f, params, x, y):
    """The oracle: one torch.autograd.grad call per example, on x[i:i+1]."""
    rows = []
    for i in range(x.shape[0]):
        live = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        loss = f(live, (x[i : i + 1], y[i : i + 1]))
        grads = torch.autograd.grad(loss, list(live.values()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


nets = st.tuples(
    st.integers(0, 10_000), st.integers(1, 9), st.integers(1, 6), st.integers(1, 7), st.integers(2, 4)
)


@given(nets)
def test_per_sample_grad_equals_autograd_loop(net):
    seed, n, d, hidden, classes = net
    model = small_mlp(seed, (d, hidden, classes))
    params, f = params_of(model), cross_entropy_loss(model)
    x, y = classification_batch(seed, n, d, classes)
    expected = autograd_loop(f, params, x, y)
    got = per_sample_grad(f)(params, (x, y))
    assert got.shape == (n, ravel(params)[0].numel())
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    looped = per_sample_grad_loop(f)(params, (x, y))
    torch.testing.assert_close(looped, expected, rtol=1e-10, atol=1e-12)


def test_dict_output_and_chunking_agree_with_flat():
    model = small_mlp(1, (4, 5, 3))
    params, f = params_of(model), cross_entropy_loss(model)
    x, y = classification_batch(1, 7, 4, 3)
    flat = per_sample_grad(f)(params, (x, y))
    chunked = per_sample_grad(f, chunk_size=3)(params, (x, y))
    torch.testing.assert_close(chunked, flat)
    as_dict = per_sample_grad(f, flatten=False)(params, (x, y))
    loop_dict = per_sample_grad_loop(f, flatten=False)(params, (x, y))
    _, unravel = ravel(params)
    for name, value in unravel(flat).items():
        assert as_dict[name].shape == (7, *params[name].shape)
        torch.testing.assert_close(as_dict[name], value)
        torch.testing.assert_close(loop_dict[name], value)


def test_mean_loss_sees_each_example_as_a_batch_of_one():
    # A loss that divides by the batch size is only per-example when the
    # example arrives with its batch dimension: shape[0] must be 1.
    seen = []

    def f(params, batch):
        (x,) = batch
        seen.append(x.shape)
        return (x @ params["w"]).pow(2).sum() / x.shape[0]

    params = {"w": torch.randn(3, dtype=torch.float64)}
    x = torch.randn(5, 3, dtype=torch.float64)
    got = per_sample_grad(f)(params, (x,))
    expected = 2 * (x @ params["w"]).unsqueeze(1) * x
    torch.testing.assert_close(got, expected)
    assert all(s == (1, 3) for s in seen)


def test_shared_argument_and_tree_in_dims():
    def f(params, batch):
        x, mask = batch
        return ((x * mask) @ params["w"]).sum()

    params = {"w": torch.randn(3, dtype=torch.float64)}
    x = torch.randn(4, 3, dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    got = per_sample_grad(f, in_dims=(None, (0, None)))(params, (x, mask))
    torch.testing.assert_close(got, x * mask)
    looped = per_sample_grad_loop(f, in_dims=(None, (0, None)))(params, (x, mask))
    torch.testing.assert_close(looped, x * mask)


def test_argnums_tuple_concatenates_all_differentiated_arguments():
    def f(a, b, batch):
        (x,) = batch
        return (x @ a["w"] * b["s"]).sum()

    a = {"w": torch.randn(3, dtype=torch.float64)}
    b = {"s": torch.tensor(2.0, dtype=torch.float64)}
    x = torch.randn(4, 3, dtype=torch.float64)
    got = per_sample_grad(f, argnums=(0, 1), in_dims=(None, None, 0))(a, b, (x,))
    expected = torch.cat([2.0 * x, (x @ a["w"]).unsqueeze(1)], dim=1)
    torch.testing.assert_close(got, expected)
    looped = per_sample_grad_loop(f, argnums=(0, 1), in_dims=(None, None, 0))(a, b, (x,))
    torch.testing.assert_close(looped, expected)


class ItemModel(nn.Module):
    """Data-dependent Python control flow through .item(): vmap cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2).double()

    def forward(self, x):
        out = self.fc(x)
        if out.sum().item() > 0:
            out = out * 2
        return out


def test_loop_fallback_handles_a_model_vmap_cannot_trace():
    torch.manual_seed(0)
    model = ItemModel()
    params = params_of(model)

    def f(p, batch):
        x, y = batch
        return nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    x, y = classification_batch(3, 6, 3, 2)
    with pytest.raises(RuntimeError):
        per_sample_grad(f)(params, (x, y))
    got = per_sample_grad_loop(f)(params, (x, y))
    torch.testing.assert_close(got, autograd_loop(f, params, x, y))


def test_unused_parameter_gets_zero_gradient_in_loop():
    def f(params, batch):
        (x,) = batch
        return (x @ params["w"]).sum()

    params = {"w": torch.randn(3), "unused": torch.randn(2)}
    got = per_sample_grad_loop(f)(params, (torch.randn(4, 3),))
    assert torch.equal(got[:, 3:], torch.zeros(4, 2))


def test_non_finite_parameters_rejected_before_computing():
    calls = []

    def f(params, batch):
        calls.append(1)
        return params["w"].sum()

    bad = {"w": torch.tensor([1.0, float("nan")])}
    for transform in (per_sample_grad, per_sample_grad_loop):
        with pytest.raises(ValueError, match=r"argument 0.*\['w'\]"):
            transform(f)(bad, (torch.ones(3, 2),))
    assert not calls


def test_non_finite_gradients_name_the_examples():
    def f(params, batch):
        (x,) = batch
        return (torch.sqrt(x) * params["w"]).sum()

    x = torch.tensor([[1.0, 1.0], [0.0, 1.0], [4.0, 1.0]])
    params = {"w": torch.ones(2)}
    x[1, 0] = -1.0
    with pytest.raises(ValueError, match=r"examples \[1\]"):
        per_sample_grad(f)(params, (x,))
    with pytest.raises(ValueError, match=r"examples \[1\]"):
        per_sample_grad_loop(f)(params, (x,))


def test_bad_arguments():
    with pytest.raises(TypeError, match="f"):
        per_sample_grad(3)
    with pytest.raises(TypeError, match="in_dims"):
        per_sample_grad(lambda p, b: p, in_dims=0)
    with pytest.raises(ValueError, match="chunk_size"):
        per_sample_grad(lambda p, b: p, chunk_size=0)
    g = per_sample_grad(lambda p, b: p["w"].sum())
    with pytest.raises(ValueError, match="in_dims has 2 entries"):
        g({"w": torch.ones(2)})
    with pytest.raises(ValueError, match="disagree"):
        g({"w": torch.ones(2)}, (torch.ones(3, 2), torch.ones(4)))


def test_input_gradients_loop_matches_vmap():
    # Differentiating the batched argument: each row is d loss_i / d x_i, shaped like one example.
    model = small_mlp(2, (3, 4, 2))
    params, f = params_of(model), cross_entropy_loss(model)
    x, y = classification_batch(2, 5, 3, 2)

    def g(p, inputs, labels):
        return f(p, (inputs, labels))

    vm = per_sample_grad(g, argnums=1, in_dims=(None, 0, 0))(params, x, y)
    lp = per_sample_grad_loop(g, argnums=1, in_dims=(None, 0, 0))(params, x, y)
    assert vm.shape == lp.shape == (5, 3)
    torch.testing.assert_close(lp, vm)
    rows = []
    for i in range(5):
        xi = x[i : i + 1].clone().requires_grad_(True)
        rows.append(torch.autograd.grad(g(params, xi, y[i : i + 1]), xi)[0][0])
    torch.testing.assert_close(vm, torch.stack(rows))


def test_empty_batch_and_bad_argnums_are_rejected():
    model = small_mlp(0, (2, 3, 2))
    params, f = params_of(model), cross_entropy_loss(model)
    empty = (torch.zeros(0, 2, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
    for transform in (per_sample_grad, per_sample_grad_loop):
        with pytest.raises(ValueError, match="no examples"):
            transform(f)(params, empty)
    with pytest.raises(TypeError, match="argnums"):
        per_sample_grad(f, argnums="0")(params, classification_batch(0, 3, 2, 2))
