import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from attrib_core import fvp, gnvp, hessian, hvp, make_fvp, make_gnvp, make_hvp, per_sample_grad, ravel
from tests.helpers import classification_batch, cross_entropy_loss, params_of, small_mlp

nets = st.tuples(
    st.integers(0, 10_000),  # seed
    st.integers(1, 8),  # examples
    st.integers(1, 5),  # input width
    st.integers(1, 6),  # hidden width
    st.integers(2, 4),  # classes
    st.integers(1, 4),  # right-hand sides
)


def setting(net):
    seed, n, d, hidden, classes, k = net
    model = small_mlp(seed, (d, hidden, classes))
    params, f = params_of(model), cross_entropy_loss(model)
    batch = classification_batch(seed, n, d, classes)
    flat, unravel = ravel(params)
    V = torch.randn(k, flat.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return model, params, f, batch, flat, unravel, V


def dense_hessian(f, unravel, flat, batch):
    return torch.autograd.functional.hessian(lambda t: f(unravel(t), batch), flat)


@given(nets)
def test_hvp_modes_equal_dense_hessian(net):
    model, params, f, batch, flat, unravel, V = setting(net)
    H = dense_hessian(f, unravel, flat, batch)
    for mode in ("rev-rev", "rev-fwd"):
        torch.testing.assert_close(hvp(f, params, batch, V, mode=mode), V @ H, rtol=1e-8, atol=1e-8)


@given(nets)
def test_hessian_in_blocks_equals_dense(net):
    model, params, f, batch, flat, unravel, V = setting(net)
    expected = dense_hessian(f, unravel, flat, batch)
    # A tiny memory bound forces one row per block; the default takes one block.
    for max_bytes in (1, 1 << 30):
        H = hessian(f, params, batch, max_bytes=max_bytes)
        torch.testing.assert_close(H, expected, rtol=1e-8, atol=1e-8)
        assert torch.equal(H, H.T)


def test_make_hvp_is_reusable_damped_and_accepts_a_vector():
    model, params, f, batch, flat, unravel, V = setting((3, 6, 4, 5, 3, 3))
    H = dense_hessian(f, unravel, flat, batch)
    for mode in ("rev-rev", "rev-fwd"):
        mv = make_hvp(f, params, batch, mode=mode, damping=0.5, chunk_size=2)
        for _ in range(2):  # the linearisation is reused across calls
            torch.testing.assert_close(mv(V), V @ H + 0.5 * V)
        torch.testing.assert_close(mv(V[0]), V[0] @ H + 0.5 * V[0])


def dense_gauss_newton(model, unravel, flat, batch):
    x, y = batch
    out = lambda t: functional_call(model, unravel(t), (x,))  # noqa: E731
    outputs = out(flat)
    J = torch.autograd.functional.jacobian(out, flat).reshape(outputs.numel(), -1)
    H_out = torch.autograd.functional.hessian(
        lambda o: nn.functional.cross_entropy(o.reshape(outputs.shape), y), outputs.reshape(-1)
    )
    return J.T @ H_out @ J


@given(nets)
def test_gnvp_equals_dense_gauss_newton_and_is_psd(net):
    model, params, f, batch, flat, unravel, V = setting(net)
    out_fn = lambda p, b: functional_call(model, p, (b[0],))  # noqa: E731
    loss_fn = lambda o, b: nn.functional.cross_entropy(o, b[1])  # noqa: E731
    G = dense_gauss_newton(model, unravel, flat, batch)
    GV = gnvp(out_fn, loss_fn, params, batch, V)
    torch.testing.assert_close(GV, V @ G, rtol=1e-8, atol=1e-8)
    assert bool(((GV * V).sum(1) >= -1e-12).all())
    damped = make_gnvp(out_fn, loss_fn, params, batch, damping=2.0)(V)
    torch.testing.assert_close(damped, V @ G + 2.0 * V, rtol=1e-8, atol=1e-8)


def test_gnvp_equals_hessian_for_a_linear_model():
    # With outputs linear in the parameters the network term vanishes: G = H.
    model = nn.Linear(4, 3).double()
    params, f = params_of(model), cross_entropy_loss(model)
    batch = classification_batch(0, 6, 4, 3)
    V = torch.randn(2, 15, dtype=torch.float64)
    out_fn = lambda p, b: functional_call(model, p, (b[0],))  # noqa: E731
    loss_fn = lambda o, b: nn.functional.cross_entropy(o, b[1])  # noqa: E731
    torch.testing.assert_close(gnvp(out_fn, loss_fn, params, batch, V), hvp(f, params, batch, V))


@given(nets)
def test_fvp_equals_empirical_fisher(net):
    model, params, f, batch, flat, unravel, V = setting(net)
    G = per_sample_grad(f)(params, batch)
    F = G.T @ G / G.shape[0]
    torch.testing.assert_close(fvp(G, V), V @ F, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(make_fvp(G, damping=0.1)(V), V @ F + 0.1 * V, rtol=1e-10, atol=1e-12)


def test_bad_input_is_rejected_before_computing():
    calls = []
    model = small_mlp(0, (2, 3, 2))
    params = params_of(model)
    inner = cross_entropy_loss(model)

    def f(p, b):
        calls.append(1)
        return inner(p, b)

    batch = classification_batch(0, 4, 2, 2)
    P = ravel(params)[0].numel()
    with pytest.raises(ValueError, match=r"V: expected width P=17"):
        hvp(f, params, batch, torch.ones(2, P + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="mode"):
        hvp(f, params, batch, torch.ones(2, P), mode="fwd-fwd")
    with pytest.raises(ValueError, match="damping"):
        make_hvp(f, params, batch, damping=-1.0)
    with pytest.raises(TypeError, match="f"):
        make_hvp("loss", params, batch)
    bad = dict(params)
    bad["0.weight"] = bad["0.weight"].clone()
    bad["0.weight"][0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"0\.weight"):
        make_hvp(f, bad, batch)
    with pytest.raises(ValueError, match="max_bytes"):
        hessian(f, params, batch, max_bytes=0)
    with pytest.raises(TypeError, match="loss_fn"):
        make_gnvp(f, None, params, batch)
    assert not calls
    with pytest.raises(ValueError, match="grads"):
        make_fvp(torch.ones(3))
    with pytest.raises(ValueError, match="grads"):
        make_fvp(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"V: contains NaN"):
        make_fvp(torch.ones(3, 2))(torch.tensor([[1.0, float("nan")]]))


def test_hessian_with_a_partial_last_block_of_several_rows():
    from attrib_core.curvature import saved_activation_bytes

    model, params, f, batch, flat, unravel, V = setting((5, 6, 4, 5, 3, 1))
    P = flat.numel()  # 43: blocks of 3 rows leave a last block of 1
    per_row = 4 * P * 8 + 4 * saved_activation_bytes(f, params, batch)
    H = hessian(f, params, batch, max_bytes=3 * per_row)
    torch.testing.assert_close(H, dense_hessian(f, unravel, flat, batch), rtol=1e-8, atol=1e-8)
    model, params, f, batch, flat, unravel, V = setting((5, 6, 4, 4, 3, 1))
    P = flat.numel()  # 35: blocks of 4 leave a last block of 3
    per_row = 4 * P * 8 + 4 * saved_activation_bytes(f, params, batch)
    H = hessian(f, params, batch, max_bytes=4 * per_row)
    torch.testing.assert_close(H, dense_hessian(f, unravel, flat, batch), rtol=1e-8, atol=1e-8)


def test_empty_batch_non_finite_loss_and_low_precision():
    model, params, f, batch, flat, unravel, V = setting((1, 4, 3, 3, 2, 2))
    empty = (batch[0][:0], batch[1][:0])
    with pytest.raises(ValueError, match="batch: has no examples"):
        hessian(f, params, empty)
    with pytest.raises(ValueError, match="batch: has no examples"):
        make_hvp(f, params, empty)
    with pytest.raises(ValueError, match="no examples"):
        make_fvp(torch.zeros(0, 5))
    with pytest.raises(ValueError, match="NaN or Inf"):
        make_hvp(lambda p, b: f(p, b) * float("inf"), params, batch)
    # bf16 parameters: the model runs in bf16, the products come back in float32 at least.
    low = {k: v.to(torch.bfloat16) for k, v in params.items()}
    model_bf16 = small_mlp(1, (3, 3, 2), dtype=torch.bfloat16)
    out = hvp(cross_entropy_loss(model_bf16), low, (batch[0].to(torch.bfloat16), batch[1]), V.float())
    assert out.dtype == torch.float32
    # Damping never changes the output dtype.
    mv = make_hvp(f, {k: v.float() for k, v in params.items()}, (batch[0].float(), batch[1]))
    damped = make_hvp(f, {k: v.float() for k, v in params.items()}, (batch[0].float(), batch[1]), damping=0.1)
    assert mv(V).dtype == damped(V).dtype == torch.float64


def test_hessian_checks_f_before_running_it():
    model, params, f, batch, flat, unravel, V = setting((1, 4, 3, 3, 2, 2))
    with pytest.raises(TypeError, match="f: expected a callable"):
        hessian("loss", params, batch)
