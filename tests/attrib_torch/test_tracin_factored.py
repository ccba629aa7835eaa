"""TracIn's factored path gives each example's own gradient, for every batch and whatever the loss.

The issue's failing cases: a first batch of one example, batches of varying size in
any order, a class-weighted cross-entropy on class-sorted data, a masked token mean
with padding. Oracle: a loop of ``torch.autograd.grad`` on each example alone.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from attrib_torch import AttributionTask, TracInAttributor, TracInCP, TracInCPFast
from tests.attrib_core.test_capture_per_example import Tagger, loop_grads, losses, masked_token_mean
from tests.helpers import params_of, small_mlp

DT = torch.float64


def ragged(x, y, sizes):
    """Consecutive batches of the given sizes, in order."""
    out, start = [], 0
    for size in sizes:
        out.append((x[start : start + size], y[start : start + size]))
        start += size
    return out


@pytest.mark.parametrize("loss", ["mean", "sum", "class-weighted"])
@pytest.mark.parametrize("sizes", [(1, 7, 4), (5, 1, 2, 4), (12,)])
def test_classification_losses_and_batch_sizes(loss, sizes):
    model = small_mlp(3, (5, 7, 4))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, 5, generator=g, dtype=DT)
    y = torch.sort(torch.randint(0, 4, (16,), generator=g)).values  # class-sorted
    f = losses(model)[loss]
    task = AttributionTask(f, model, model.state_dict())
    attributor = TracInAttributor(task, [1.0], normalized_grad=False, show_progress=False)
    train = ragged(x[:12], y[:12], sizes)
    test = ragged(x[12:], y[12:], (1, 3))
    scores = attributor.attribute(train, test)
    assert attributor._factored, "the factored path was not taken"
    params = params_of(model)
    expected = loop_grads(f, params, (x[:12], y[:12])) @ loop_grads(f, params, (x[12:], y[12:])).T
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(attributor.self_attribute(train), torch.diagonal(
        loop_grads(f, params, (x[:12], y[:12])) @ loop_grads(f, params, (x[:12], y[:12])).T))


def test_masked_token_mean_with_padding():
    model = Tagger(128, 128, 3).double()  # wide enough for factors to be cheaper at 6 tokens
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 6, 128, generator=g, dtype=DT)
    y = torch.randint(0, 3, (9, 6), generator=g)
    lengths = torch.tensor([6, 1, 3, 6, 2, 5, 4, 1, 6])
    mask = (torch.arange(6)[None] < lengths[:, None]).to(DT)
    f = masked_token_mean(model)
    task = AttributionTask(f, model, model.state_dict())
    attributor = TracInAttributor(task, [1.0], normalized_grad=True, show_progress=False)
    train = [(x[:1], y[:1], mask[:1]), (x[1:6], y[1:6], mask[1:6])]
    test = [(x[6:], y[6:], mask[6:])]
    scores = attributor.attribute(train, test)
    assert attributor._factored
    params = params_of(model)
    a, b = loop_grads(f, params, (x[:6], y[:6], mask[:6])), loop_grads(f, params, (x[6:], y[6:], mask[6:]))
    a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    torch.testing.assert_close(scores, a @ b.T)


def test_a_later_batch_that_cannot_be_factored_redoes_the_call():
    """A penalty that only a later batch adds (flagged by a string field): factors are dropped, scores stay exact."""
    model = small_mlp(3, (5, 7, 4))
    base = losses(model)["mean"]

    def sometimes_penalised(params, batch):
        extra = 1e-1 * params["0.weight"].pow(2).sum() if batch[2] == "penalised" else 0.0
        return base(params, batch[:2]) + extra

    x, y = torch.randn(10, 5, dtype=DT), torch.randint(0, 4, (10,))
    task = AttributionTask(sometimes_penalised, model, model.state_dict())
    attributor = TracInAttributor(task, [1.0], normalized_grad=False, show_progress=False)
    train = [(x[:4], y[:4], "plain"), (x[4:7], y[4:7], "penalised")]
    test = [(x[7:], y[7:], "plain")]
    scores = attributor.attribute(train, test)
    assert attributor._factored is False
    params = params_of(model)
    expected_train = torch.cat([loop_grads(sometimes_penalised, params, b) for b in train])
    torch.testing.assert_close(scores, expected_train @ loop_grads(sometimes_penalised, params, test[0]).T)


def test_captum_classes_with_a_first_batch_of_one(tmp_path):
    model = small_mlp(6, (5, 6, 3))
    torch.save(model.state_dict(), tmp_path / "ckpt-0.pt")
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(9, 5, generator=g, dtype=DT), torch.sort(torch.randint(0, 3, (9,), generator=g)).values
    weight = torch.tensor([0.3, 2.0, 1.0], dtype=DT)
    loss_fn = nn.CrossEntropyLoss(weight=weight, reduction="mean")
    params = params_of(model)

    def f(p, batch):
        return loss_fn(functional_call(model, p, (batch[0],)), batch[1])

    train = DataLoader(TensorDataset(x[:6], y[:6]), batch_size=1)
    expected = loop_grads(f, params, (x[6:], y[6:])) @ loop_grads(f, params, (x[:6], y[:6])).T
    tracin = TracInCP(model, train, str(tmp_path), loss_fn=loss_fn, sample_wise_grads_per_batch=True)
    torch.testing.assert_close(tracin.influence((x[6:], y[6:])), expected)
    fast = TracInCPFast(model, "2", train, str(tmp_path), loss_fn=loss_fn)
    names = [n for n in params for _ in range(params[n].numel())]
    last = [i for i, n in enumerate(names) if n == "2.weight"]
    full_a, full_b = loop_grads(f, params, (x[6:], y[6:])), loop_grads(f, params, (x[:6], y[:6]))
    torch.testing.assert_close(fast.influence((x[6:], y[6:])), full_a[:, last] @ full_b[:, last].T)


class Keywords(nn.Module):
    """Layers called with input=, and a user's forward hook on a factored layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(8)
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 4)

    def forward(self, x):
        return self.b(input=torch.tanh(self.a(input=x)))


@pytest.mark.parametrize("hook", [None, "scale", "reads-weight"])
def test_user_hooks_and_keyword_calls_keep_scores_exact(hook):
    model = Keywords().double()
    if hook == "scale":
        model.a.register_forward_hook(lambda module, args, out: 2 * out)
    elif hook == "reads-weight":
        model.a.register_forward_hook(lambda module, args, out: out + 0.1 * module.weight.sum())
    f = losses(model)["mean"]
    x, y = torch.randn(9, 5, dtype=DT), torch.randint(0, 4, (9,))
    attributor = TracInAttributor(AttributionTask(f, model, model.state_dict()), [1.0], False, show_progress=False)
    scores = attributor.attribute([(x[:6], y[:6])], [(x[6:], y[6:])])
    params = params_of(model)
    torch.testing.assert_close(scores, loop_grads(f, params, (x[:6], y[:6])) @ loop_grads(f, params, (x[6:], y[6:])).T)
    assert bool(attributor._factored) == (hook != "reads-weight")  # a hook reading the weight: explicit gradients


def test_generate_train_rep_called_directly_falls_back_without_leaking():
    model = small_mlp(3, (5, 7, 4))
    base = losses(model)["mean"]

    def sometimes_penalised(params, batch):
        return base(params, batch[:2]) + (1e-1 * params["0.weight"].pow(2).sum() if batch[2] == "p" else 0.0)

    x, y = torch.randn(6, 5, dtype=DT), torch.randint(0, 4, (6,))
    attributor = TracInAttributor(AttributionTask(sometimes_penalised, model, model.state_dict()), [1.0], False,
                                  show_progress=False)
    assert isinstance(attributor.generate_train_rep(0, (x[:3], y[:3], "plain")), dict)  # factors
    rep = attributor.generate_train_rep(0, (x[3:], y[3:], "p"))
    torch.testing.assert_close(rep, loop_grads(sometimes_penalised, params_of(model), (x[3:], y[3:], "p")))
