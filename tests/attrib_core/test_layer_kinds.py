"""Hugging Face's Conv1D and nn.Embedding as tracked layers, checked against independent oracles.

A Conv1D is an ``nn.Linear`` with its weight stored transposed; an Embedding is an
``nn.Linear`` without bias applied to one-hot rows of the ids, its weight stored
transposed. So each model here has a twin built of ``nn.Linear`` layers with the same
function, and what the library computes on the original (per-example gradients from
factors, factored products, EK-FAC) must equal what it computes on the twin, translated
to the original's layout, and the ``vmap`` gradients of the original itself.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from attrib_core import (
    capture,
    capture_per_example,
    ekfac,
    factored_dense,
    factored_inner,
    layer_specs,
    per_sample_grad,
)

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

V, D, H, C, T = 7, 5, 4, 3, 6


class Tokens(nn.Module):
    """Embedding (padding row 0) -> Conv1D -> tanh -> masked mean over tokens -> Linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D, padding_idx=0)
        self.mix = Conv1D(H, D)  # nf=H outputs, nx=D inputs: weight (D, H)
        self.head = nn.Linear(H, C)

    def forward(self, ids, mask):
        h = torch.tanh(self.mix(self.embed(ids)))
        pooled = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        return self.head(pooled)


class Twin(nn.Module):
    """The same function from nn.Linear layers: one-hot ids through a bias-free Linear, a Linear for the Conv1D."""

    def __init__(self, original: Tokens):
        super().__init__()
        self.embed = nn.Linear(V, D, bias=False)
        self.mix = nn.Linear(D, H)
        self.head = nn.Linear(H, C)
        with torch.no_grad():
            weight = original.embed.weight.clone()
            weight[0] = 0  # the padding row: its one-hot column is dropped below, as torch drops its gradient
            self.embed.weight.copy_(weight.T)
            self.mix.weight.copy_(original.mix.weight.T)
            self.mix.bias.copy_(original.mix.bias)
            self.head.load_state_dict(original.head.state_dict())

    def forward(self, onehot, mask):
        h = torch.tanh(self.mix(self.embed(onehot)))
        pooled = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        return self.head(pooled)


def make(seed=0):
    torch.manual_seed(seed)
    model = Tokens().double()
    with torch.no_grad():
        model.embed.weight[0] = 0.0
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (5, T), generator=g)
    lengths = torch.tensor([6, 4, 3, 6, 1])
    mask = (torch.arange(T) < lengths[:, None]).double()
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))  # padding id 0 after each sequence
    labels = torch.randint(0, C, (5,), generator=g)
    return model, (ids, mask, labels)


def loss_of(model):
    def f(params, batch):
        ids, mask, labels = batch
        return nn.functional.cross_entropy(functional_call(model, params, (ids, mask)), labels)

    return f


def params_of(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def onehot_batch(batch):
    ids, mask, labels = batch
    onehot = nn.functional.one_hot(ids, V).double()
    onehot[..., 0] = 0
    return onehot, mask, labels


TRANSPOSED = ("embed.weight", "mix.weight")  # stored (d_in, d_out) in the original, (d_out, d_in) in the twin


def to_original_layout(twin_grads, names):
    """Per-example gradients ``{name: (n, *shape)}`` of the twin's parameters, laid out as the original's."""
    n = twin_grads["head.weight"].shape[0]
    return torch.cat([(twin_grads[k].transpose(1, 2) if k in TRANSPOSED else twin_grads[k]).reshape(n, -1)
                      for k in names], dim=1)


def split_rows(flat, params):
    """Rows ``(n, P)`` of vectors laid out as ``params`` as ``{name: (n, *shape)}``."""
    parts = torch.split(flat, [v.numel() for v in params.values()], dim=1)
    return {k: p.reshape(-1, *v.shape) for (k, v), p in zip(params.items(), parts)}


def to_twin_layout(flat, params):
    """Rows laid out as the original's parameters, laid out as the twin's (the inverse of to_original_layout)."""
    parts = split_rows(flat, params)
    return torch.cat([(parts[k].transpose(1, 2) if k in TRANSPOSED else parts[k]).reshape(len(flat), -1)
                      for k in params], dim=1)


def test_specs_read_the_layouts_of_conv1d_and_embedding():
    model, _ = make()
    specs = {s.module: s for s in layer_specs(model, params_of(model), None)}
    assert (specs["embed"].kind, specs["embed"].d_in, specs["embed"].d_out, specs["embed"].bias) == \
        ("embedding", V, D, None)
    assert (specs["mix"].kind, specs["mix"].d_in, specs["mix"].d_out, specs["mix"].bias) == \
        ("conv1d", D, H, "mix.bias")
    M = torch.randn(2, H, D, dtype=torch.float64)
    flat = specs["mix"].as_weight(M)
    torch.testing.assert_close(flat.reshape(2, D, H), M.transpose(1, 2))  # stored (d_in, d_out)
    torch.testing.assert_close(specs["mix"].as_matrix(flat), M)


@pytest.mark.parametrize("per_example", [True, False])
def test_factors_give_the_per_example_gradients_of_vmap_and_of_the_linear_twin(per_example):
    model, batch = make()
    params, f = params_of(model), loss_of(model)
    names = list(params)
    specs = layer_specs(model, params, None)
    if per_example:
        captured = capture_per_example(model, f, params, batch, specs, mask=batch[1])
    else:
        captured = capture(model, f, params, batch, specs, reduction="mean", mask=batch[1])
    from_factors = factored_dense(captured, specs, names)
    vmapped = per_sample_grad(f)(params, batch)
    torch.testing.assert_close(from_factors, vmapped)
    twin = Twin(model).double()
    twin_grads = per_sample_grad(loss_of(twin), flatten=False)(params_of(twin), onehot_batch(batch))
    torch.testing.assert_close(to_original_layout(twin_grads, names), vmapped)
    torch.testing.assert_close(factored_inner(captured, captured), vmapped @ vmapped.T)


def test_ekfac_on_conv1d_and_embedding_equals_ekfac_on_the_linear_twin():
    model, batch = make()
    twin = Twin(model).double()
    halves = [tuple(x[:3] for x in batch), tuple(x[3:] for x in batch)]
    mask = lambda b: b[1]  # noqa: E731
    fit = ekfac(model, loss_of(model), params_of(model), halves, mask=mask)
    twin_fit = ekfac(twin, loss_of(twin), params_of(twin), [onehot_batch(b) for b in halves], mask=mask)
    for layer, twin_layer in zip(fit.layers, twin_fit.layers):
        assert layer.spec.module == twin_layer.spec.module
        torch.testing.assert_close(layer.eigenvalues, twin_layer.eigenvalues)
    # The same operator: solve in the original's layout = translate, solve on the twin, translate back.
    g = torch.Generator().manual_seed(1)
    B = torch.randn(2, fit.dim, generator=g, dtype=torch.float64)
    twin_x = split_rows(twin_fit.solve(to_twin_layout(B, params_of(model)), damping=0.1).x, params_of(twin))
    torch.testing.assert_close(fit.solve(B, damping=0.1).x, to_original_layout(twin_x, list(params_of(model))))


def test_layers_that_cannot_be_factored_exactly_are_left_out_or_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(V, D)
            self.body = nn.Linear(D, D)
            self.out = nn.Linear(D, V, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, ids):
            return self.out(torch.tanh(self.body(self.embed(ids))))

    model = Tied()
    params = dict(model.named_parameters())
    assert [s.module for s in layer_specs(model, params, None)] == ["body"]
    with pytest.raises(ValueError, match="tied to that of \\['out'\\]"):
        layer_specs(model, params, ["embed"])
    big = nn.Embedding(10_000, 2)
    with pytest.raises(ValueError, match="10,000 rows"):
        layer_specs(big, dict(big.named_parameters()), [""])
    with pytest.raises(ValueError, match="max_norm"):
        normed = nn.Embedding(4, 2, max_norm=1.0)
        layer_specs(normed, dict(normed.named_parameters()), [""])
    uneven = nn.Conv2d(1, 1, 2, padding="same")  # a kernel of 2 pads one side only
    with pytest.raises(ValueError, match="asymmetric 'same' padding"):
        layer_specs(uneven, dict(uneven.named_parameters()), [""])


def test_a_layer_output_shared_by_the_batch_gets_per_example_output_gradients():
    """Position embeddings of (1, T) ids, broadcast over the batch (as GPT-2's): each example's own part."""

    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens = nn.Embedding(V, D)
            self.positions = nn.Embedding(T, D)
            self.head = nn.Linear(D, C)

        def forward(self, ids):
            h = self.tokens(ids) + self.positions(torch.arange(ids.shape[1]).unsqueeze(0))
            return self.head(torch.tanh(h).mean(1))

    torch.manual_seed(0)
    model = Positions().double()
    g = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, V, (4, T), generator=g), torch.randint(0, C, (4,), generator=g))

    def f(params, b):
        return nn.functional.cross_entropy(functional_call(model, params, (b[0],)), b[1], reduction="sum")

    params = params_of(model)
    specs = layer_specs(model, params, None)
    captured = capture(model, f, params, batch, specs, reduction="sum")
    assert captured["positions"].a.shape == (4, T, T)
    torch.testing.assert_close(factored_dense(captured, specs, list(params)), per_sample_grad(f)(params, batch))
