"""Per-example factors are those of each example presented as a batch of one, whatever the loss normalises by.

Oracle: a loop of ``torch.autograd.grad`` on every example alone (the data convention).
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from attrib_core import DirectParameterUse, capture_per_example, factored_dense, layer_specs
from tests.attrib_core.test_factored import TinyCNN
from tests.helpers import params_of, small_mlp

DT = torch.float64


class Tagger(nn.Module):
    """A token tagger: a Linear at every position, then a per-token head."""

    def __init__(self, d_in=4, hidden=6, classes=3):
        super().__init__()
        self.proj = nn.Linear(d_in, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)))


def loop_grads(f, params, batch):
    """``(B, P)``: row i is the gradient of ``f`` on example i alone, as a batch of one."""
    n = batch[0].shape[0]
    rows = []
    for i in range(n):
        live = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        example = tuple(t[i : i + 1] if isinstance(t, torch.Tensor) and t.dim() else t for t in batch)
        grads = torch.autograd.grad(f(live, example), list(live.values()), allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(v) if g is None else g).reshape(-1)
                               for v, g in zip(live.values(), grads)]))
    return torch.stack(rows)


def losses(model):
    weight = torch.tensor([0.2, 3.0, 1.0, 0.5], dtype=DT)

    def mean(params, batch):
        return nn.functional.cross_entropy(functional_call(model, params, (batch[0],)), batch[1])

    def summed(params, batch):
        return nn.functional.cross_entropy(functional_call(model, params, (batch[0],)), batch[1], reduction="sum")

    def class_weighted(params, batch):  # normalised by the batch's total class weight
        return nn.functional.cross_entropy(functional_call(model, params, (batch[0],)), batch[1], weight=weight)

    return {"mean": mean, "sum": summed, "class-weighted": class_weighted}


def masked_token_mean(model):
    def f(params, batch):
        x, y, mask = batch
        logits = functional_call(model, params, (x,))
        per_token = nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none")
        return (per_token * mask).sum() / mask.sum()  # the batch's token count: not the example's

    return f


@pytest.mark.parametrize("loss", ["mean", "sum", "class-weighted"])
def test_classification_losses(loss):
    model = small_mlp(0, (5, 7, 4))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 5, generator=g, dtype=DT)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3])  # class-sorted, as the failing case
    f, params = losses(model)[loss], params_of(model)
    specs = layer_specs(model, params, None)
    expected = loop_grads(f, params, (x, y))
    for batch in ((x, y), (x[:1], y[:1]), (x[3:5], y[3:5])):
        got = factored_dense(capture_per_example(model, f, params, batch, specs), specs, list(params))
        start = {1: 0, 2: 3, 9: 0}[batch[0].shape[0]]
        torch.testing.assert_close(got, expected[start : start + batch[0].shape[0]])


def test_masked_token_mean_and_a_string_field():
    model = Tagger().double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 6, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (5, 6), generator=g)
    lengths = torch.tensor([6, 2, 4, 1, 5])
    mask = (torch.arange(6)[None] < lengths[:, None]).to(DT)
    f = masked_token_mean(model)
    params = params_of(model)
    specs = layer_specs(model, params, None)
    captured = capture_per_example(model, lambda p, b: f(p, b[:3]), params, (x, y, mask, "ids"), specs)
    torch.testing.assert_close(factored_dense(captured, specs, list(params)), loop_grads(f, params, (x, y, mask)))


def test_convolution():
    model = TinyCNN().double()
    params = params_of(model)
    x, y = torch.randn(4, 1, 4, 4, dtype=DT), torch.tensor([0, 4, 4, 1])
    f = losses(model)["mean"]
    specs = layer_specs(model, params, None)
    torch.testing.assert_close(factored_dense(capture_per_example(model, f, params, (x, y), specs), specs,
                                              list(params)), loop_grads(f, params, (x, y)))


def test_direct_use_of_a_weight_is_refused():
    model = small_mlp(0, (5, 7, 4))
    params = params_of(model)
    base = losses(model)["mean"]

    def penalised(p, batch):
        return base(p, batch) + 1e-2 * p["0.weight"].pow(2).sum()

    x, y = torch.randn(3, 5, dtype=DT), torch.tensor([0, 1, 2])
    specs = layer_specs(model, params, None)
    with pytest.raises(DirectParameterUse, match="0.weight"):
        capture_per_example(model, penalised, params, (x, y), specs)
    # a penalty on a parameter that is not factored changes nothing that is captured
    only_last = layer_specs(model, params, "2")
    capture_per_example(model, penalised, params, (x, y), only_last)


def test_shared_layer_is_refused():
    lin = nn.Linear(3, 3).double()
    model = nn.Sequential(lin, nn.Tanh(), lin)
    params = params_of(model)
    f = losses(model)["sum"]
    with pytest.raises(ValueError, match="more than once"):
        capture_per_example(model, f, params, (torch.randn(2, 3, dtype=DT), torch.tensor([0, 1])),
                            layer_specs(model, params, None))
