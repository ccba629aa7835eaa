"""K-FAC and EK-FAC against dense per-sample gradient outer products."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from attrib_core import cg, ekfac, kfac_factors, make_fvp, per_sample_grad, select

DT = torch.float64


def dense_fisher(f, params, names, batch):
    """Empirical Fisher mean_i g_i g_iᵀ over the parameters ``names``, from per-sample gradients."""
    chosen = select(params, list(names))

    def restricted(sub, b):
        return f({**params, **sub}, b)

    G = per_sample_grad(restricted)(chosen, batch)
    return G.T @ G / G.shape[0], G


def eigenbasis(layer, names, sizes):
    """Columns: vec(q_s q_aᵀ) in the flat layout [... weight row-major ..., bias ...]."""
    spec, QA, QS = layer.spec, layer.QA, layer.QS
    offsets = dict(zip(names, torch.tensor((0,) + sizes).cumsum(0).tolist()))
    dim = sum(sizes)
    cols = []
    for s in range(spec.d_out):
        for a in range(spec.d_a):
            E = torch.outer(QS[:, s], QA[:, a])
            col = torch.zeros(dim, dtype=DT)
            start = offsets[spec.weight]
            col[start : start + spec.d_out * spec.d_in] = E[:, : spec.d_in].reshape(-1)
            if spec.bias is not None:
                col[offsets[spec.bias] : offsets[spec.bias] + spec.d_out] = E[:, spec.d_in]
            cols.append(col)
    return torch.stack(cols, dim=1)


def loss_of(model):
    def f(params, batch):
        x, y = batch[0], batch[-1]
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return f


def params_of(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("correct", [True, False])
def test_kfac_is_exact_for_one_linear_layer_and_one_example(bias, correct):
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=bias).double()
    params, f = params_of(model), loss_of(model)
    batch = (torch.randn(1, 4, dtype=DT), torch.tensor([2]))
    fit = ekfac(model, f, params, [batch], correct=correct)
    F, _ = dense_fisher(f, params, fit.names, batch)
    approx = fit.matvec(torch.eye(fit.dim, dtype=DT))
    torch.testing.assert_close(approx, F, rtol=1e-10, atol=1e-12)
    assert fit.names == (("weight", "bias") if bias else ("weight",))


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(5, 6)
        self.head = nn.Linear(6, 3, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.hidden(x)))


def check_ekfac_exact_on_eigenbasis_diagonal(model, f, params, batches, **kwargs):
    fit = ekfac(model, f, params, batches, **kwargs)
    merged = tuple(torch.cat([b[i] for b in batches]) for i in range(len(batches[0])))
    F, _ = dense_fisher(f, params, fit.names, merged)
    Q = torch.cat([eigenbasis(layer, fit.names, fit.sizes) for layer in fit.layers], dim=1)
    torch.testing.assert_close(Q.T @ Q, torch.eye(fit.dim, dtype=DT), rtol=0, atol=1e-10)
    lam = torch.cat([layer.eigenvalues.reshape(-1) for layer in fit.layers])
    # Exact on the diagonal of the eigenbasis...
    torch.testing.assert_close(torch.diagonal(Q.T @ F @ Q), lam, rtol=1e-8, atol=1e-12)
    # ...and the operator is that diagonal in that basis, in the flat parameter layout.
    torch.testing.assert_close(fit.matvec(torch.eye(fit.dim, dtype=DT)), Q @ torch.diag(lam) @ Q.T, rtol=1e-8, atol=1e-12)
    return fit, F


def test_ekfac_exact_on_eigenbasis_diagonal_for_an_mlp_over_several_batches():
    torch.manual_seed(1)
    model = TwoLayer().double()
    params, f = params_of(model), loss_of(model)
    batches = [(torch.randn(7, 5, dtype=DT), torch.randint(0, 3, (7,))) for _ in range(3)]
    fit, F = check_ekfac_exact_on_eigenbasis_diagonal(model, f, params, batches)
    assert fit.names == ("hidden.weight", "hidden.bias", "head.weight")
    assert [layer.spec.d_a for layer in fit.layers] == [6, 6]
    # Solve inverts matvec, damping and all.
    V = torch.randn(4, fit.dim, dtype=DT)
    torch.testing.assert_close(fit.solve(fit.matvec(V, damping=0.3), damping=0.3).x, V)
    # One damping per layer: each layer's block is its own dense (F̂_l + λ_l I)⁻¹, built from matvec.
    dampings = (0.3, 0.05)
    dense = torch.stack([fit.matvec(e, damping=0.0) for e in torch.eye(fit.dim, dtype=DT)], dim=1)
    split = fit.sizes[0] + fit.sizes[1]  # hidden.weight, hidden.bias | head.weight
    shift = torch.cat([torch.full((split,), dampings[0], dtype=DT),
                       torch.full((fit.dim - split,), dampings[1], dtype=DT)])
    expected = torch.linalg.solve(dense + torch.diag(shift), V.T).T
    torch.testing.assert_close(fit.solve(V, damping=dampings).x, expected)
    # Powers: 1 is matvec, -1 is solve, -1/2 twice is solve.
    torch.testing.assert_close(fit.power(V, 1.0, damping=dampings), fit.matvec(V, damping=dampings))
    torch.testing.assert_close(fit.power(V, -1.0, damping=dampings), expected)
    half = fit.power(V, -0.5, damping=dampings)
    torch.testing.assert_close(fit.power(half, -0.5, damping=dampings), expected)
    means = [float(layer.eigenvalues.mean()) for layer in fit.layers]
    assert fit.heuristic_damping() == pytest.approx([0.1 * m for m in means])
    with pytest.raises(ValueError, match="one value per layer"):
        fit.solve(V, damping=(0.1,))


class Sequence(nn.Module):
    """Linear over (B, T, d) tokens, masked mean over valid tokens, then a classifier."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x, mask):
        h = torch.tanh(self.embed(x))
        pooled = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        return self.head(pooled)


def sequence_loss(model):
    def f(params, batch):
        x, mask, y = batch
        return nn.functional.cross_entropy(functional_call(model, params, (x, mask)), y)

    return f


def sequence_batch(seed, B=6, T=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 4, generator=g, dtype=DT)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).to(DT)
    return x, mask, torch.randint(0, 3, (B,), generator=g)


def test_ekfac_exact_on_sequences_and_ignores_padded_positions():
    torch.manual_seed(2)
    model = Sequence().double()
    params, f = params_of(model), sequence_loss(model)
    batches = [sequence_batch(0), sequence_batch(1)]
    fit, _ = check_ekfac_exact_on_eigenbasis_diagonal(model, f, params, batches, mask=lambda b: b[1])
    # Garbage at padded positions changes nothing when the mask is given.
    noisy = [(x + 100.0 * (1 - m).unsqueeze(-1), m, y) for x, m, y in batches]
    refit = ekfac(model, f, params, noisy, mask=lambda b: b[1])
    for a, b in zip(fit.layers, refit.layers):
        torch.testing.assert_close(a.eigenvalues, b.eigenvalues)
    factors = kfac_factors(model, f, params, batches, mask=lambda b: b[1])
    valid = int(sum(b[1].sum() for b in batches))
    assert factors.layers[0].positions == valid and factors.layers[1].positions == 12


class Conv(nn.Module):
    def __init__(self, bias, stride):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3, padding=1, stride=stride, bias=bias)
        self.fc = nn.Linear(3 * (5 if stride == 1 else 3) ** 2, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


@pytest.mark.parametrize("bias,stride", [(True, 1), (False, 2)])
def test_ekfac_exact_for_conv2d(bias, stride):
    torch.manual_seed(3)
    model = Conv(bias, stride).double()
    params, f = params_of(model), loss_of(model)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(6, 2, 5, 5, generator=g, dtype=DT), torch.randint(0, 4, (6,), generator=g))]
    fit, _ = check_ekfac_exact_on_eigenbasis_diagonal(model, f, params, batches)
    conv = fit.layers[0].spec
    assert conv.kind == "conv2d" and conv.d_in == 2 * 3 * 3 and conv.d_a == 18 + bias


def test_kfac_factors_are_the_defined_averages():
    torch.manual_seed(4)
    model = nn.Linear(3, 2).double()
    params, f = params_of(model), loss_of(model)
    x, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 2, (5,))
    (layer,) = kfac_factors(model, f, params, [(x, y)]).layers
    a = torch.cat([x, torch.ones(5, 1, dtype=DT)], dim=1)
    probs = torch.softmax(x @ params["weight"].T + params["bias"], dim=1)
    ds = probs - nn.functional.one_hot(y, 2)  # per-example d loss / d logits
    torch.testing.assert_close(layer.A, a.T @ a / 5)
    torch.testing.assert_close(layer.S, ds.T @ ds / 5)
    # Each example's own loss, whatever the batch's normalisation: class weights cancel for one example.
    weighted = kfac_factors(model, lambda p, b: nn.functional.cross_entropy(
        torch.func.functional_call(model, p, (b[0],)), b[1], weight=torch.tensor([0.2, 3.0], dtype=DT)),
        params, [(x, y)]).layers[0]
    torch.testing.assert_close(weighted.S, layer.S)
    # And a loss scaled by 5 has gradients 5 times larger: S 25 times (reduction only matters without vmap).
    scaled = kfac_factors(model, lambda p, b: f(p, b) * 5, params, [(x, y)], reduction="sum").layers[0]
    torch.testing.assert_close(scaled.S, 25 * layer.S)


def test_ekfac_preconditioner_cuts_cg_steps_on_the_empirical_fisher():
    torch.manual_seed(5)
    model = TwoLayer().double()
    params, f = params_of(model), loss_of(model)
    batch = (torch.randn(64, 5, dtype=DT) * torch.logspace(-1, 1, 5, dtype=DT), torch.randint(0, 3, (64,)))
    fit = ekfac(model, f, params, [batch])
    _, G = dense_fisher(f, params, fit.names, batch)
    B = torch.randn(3, fit.dim, dtype=DT)
    damping = 1e-4
    plain = cg(make_fvp(G), B, tol=1e-6, damping=damping)
    pre = cg(make_fvp(G), B, tol=1e-6, damping=damping, preconditioner=fit.preconditioner(damping=damping))
    assert bool(pre.converged.all()) and bool(plain.converged.all())
    assert int(pre.steps.max()) < int(plain.steps.min())


class WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.norm = nn.LayerNorm(3)

    def forward(self, x):
        return self.norm(self.fc(x))


def test_bad_input():
    model = WithNorm().double()
    params, f = params_of(model), loss_of(model)
    batch = (torch.randn(4, 3, dtype=DT), torch.randint(0, 3, (4,)))
    with pytest.raises(ValueError, match="'norm' is a LayerNorm"):
        ekfac(model, f, params, [batch], layers=["fc", "norm"])
    with pytest.raises(ValueError, match="not modules"):
        ekfac(model, f, params, [batch], layers="decoder")
    with pytest.raises(TypeError, match="iterator"):
        ekfac(model, f, params, iter([batch]))
    with pytest.raises(ValueError, match="no batch"):
        kfac_factors(model, f, params, [])
    bad = (torch.tensor([[1.0, float("inf"), 0.0]], dtype=DT), torch.tensor([0]))
    with pytest.raises(ValueError, match="layer 'fc'"):
        kfac_factors(model, f, params, [bad])
    with pytest.raises(ValueError, match="reduction"):
        kfac_factors(model, f, params, [batch], reduction="none")
    # One example: K-FAC has exact zeros, so an undamped solve is refused.
    fit = ekfac(model, f, params, [(batch[0][:1], batch[1][:1])], layers="fc")
    with pytest.raises(ValueError, match="damping"):
        fit.solve(torch.ones(1, fit.dim, dtype=DT), damping=0.0)
    with pytest.raises(ValueError, match="width"):
        fit.solve(torch.ones(1, fit.dim + 1, dtype=DT), damping=1.0)
    shared = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    twice = lambda p, b: functional_call(shared, p, (functional_call(shared, p, (b[0],)),)).sum()  # noqa: E731
    with pytest.raises(ValueError, match="more than once"):
        kfac_factors(shared.double(), twice, params_of(shared), [batch])
    grouped = nn.Conv2d(2, 2, 3, groups=2)
    with pytest.raises(ValueError, match="grouped"):
        kfac_factors(grouped, f, params_of(grouped), [batch])


class FlatTokens(Sequence):
    """The same model, with the tokens flattened into the batch before the embedding."""

    def forward(self, x, mask):
        B, T, d = x.shape
        h = torch.tanh(self.embed(x.reshape(B * T, d))).reshape(B, T, -1)
        pooled = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        return self.head(pooled)


def test_tokens_flattened_into_the_batch_give_the_same_fit():
    torch.manual_seed(6)
    model = Sequence().double()
    flat = FlatTokens().double()
    flat.load_state_dict(model.state_dict())
    batches = [sequence_batch(3), sequence_batch(4)]
    a = kfac_factors(model, sequence_loss(model), params_of(model), batches, mask=lambda b: b[1])
    b = kfac_factors(flat, sequence_loss(flat), params_of(flat), batches, mask=lambda b: b[1])
    for x, y in zip(a.layers, b.layers):
        torch.testing.assert_close(x.A, y.A)
        torch.testing.assert_close(x.S, y.S)
        assert x.examples == y.examples == 12


def test_factor_scaling_with_several_positions_per_example():
    # A = mean over valid positions of ã ãᵀ; S = mean over examples of Σ_t ds dsᵀ, with ã and ds
    # computed here independently: inputs by hand, output gradients by autograd per example.
    torch.manual_seed(7)
    model = Sequence().double()
    params, f = params_of(model), sequence_loss(model)
    x, mask, y = sequence_batch(5)
    (embed, _) = kfac_factors(model, f, params, [(x, mask, y)], mask=lambda b: b[1]).layers
    a = torch.cat([x, torch.ones(*x.shape[:2], 1, dtype=DT)], dim=-1) * mask.unsqueeze(-1)
    torch.testing.assert_close(embed.A, torch.einsum("bti,btj->ij", a, a) / mask.sum())
    S = torch.zeros(5, 5, dtype=DT)
    for i in range(x.shape[0]):
        s = torch.nn.functional.linear(x[i : i + 1], params["embed.weight"], params["embed.bias"]).requires_grad_(True)
        h = torch.tanh(s)
        m = mask[i : i + 1]
        pooled = (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True)
        out = torch.nn.functional.linear(pooled, params["head.weight"], params["head.bias"])
        (ds,) = torch.autograd.grad(nn.functional.cross_entropy(out, y[i : i + 1]), s)
        S += ds[0].T @ ds[0]
    torch.testing.assert_close(embed.S, S / x.shape[0])


def test_conv_factors_are_patch_averages():
    torch.manual_seed(8)
    model = Conv(True, 1).double()
    params, f = params_of(model), loss_of(model)
    x, y = torch.randn(3, 2, 5, 5, dtype=DT), torch.randint(0, 4, (3,))
    conv = kfac_factors(model, f, params, [(x, y)], layers="conv").layers[0]
    patches = nn.functional.unfold(x, 3, padding=1).transpose(1, 2)  # (B, 25, 18)
    a = torch.cat([patches, torch.ones(3, 25, 1, dtype=DT)], dim=-1)
    torch.testing.assert_close(conv.A, torch.einsum("bti,btj->ij", a, a) / (3 * 25))
    assert conv.positions == 75 and conv.examples == 3


def test_low_rank_keeps_each_layers_best_approximation():
    """Eckart–Young per layer, against the SVD of each layer's matrix laid out by hand ([W | b], then W alone)."""
    torch.manual_seed(2)
    model = TwoLayer().double()
    params, f = params_of(model), loss_of(model)
    fit = ekfac(model, f, params, [(torch.randn(9, 5, dtype=DT), torch.randint(0, 3, (9,)))])
    V = torch.randn(3, fit.dim, dtype=DT)
    hidden_w, hidden_b, head_w = V.split(fit.sizes, dim=1)

    def best(M, r):
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]

    for rank in (1, 2):
        expected = []
        for k in range(3):
            hidden = best(torch.cat([hidden_w[k].reshape(6, 5), hidden_b[k].reshape(6, 1)], 1), rank)
            head = best(head_w[k].reshape(3, 6), rank)
            expected.append(torch.cat([hidden[:, :5].reshape(-1), hidden[:, 5], head.reshape(-1)]))
        torch.testing.assert_close(fit.low_rank(V, rank), torch.stack(expected))
    torch.testing.assert_close(fit.low_rank(V, 6), V)  # no layer's matrix has rank above 6: unchanged
    with pytest.raises(ValueError, match="rank"):
        fit.low_rank(V, 0)
