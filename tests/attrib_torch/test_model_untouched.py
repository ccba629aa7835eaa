"""Every attributor leaves the user's model and torch's global RNG as it found them, and ignores frozen parameters.

One sweep over every attributor class and every public call (``cache``, ``attribute``,
``self_attribute``, ``topk``), also when the call raises: parameters, buffers,
``training`` flags, ``requires_grad`` flags, hooks and the RNG state are compared
before and after. The model is in train mode with Dropout and BatchNorm, holds a
frozen layer and a user hook, and the task's checkpoint differs from its weights.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from attrib_torch import (
    AttributionTask,
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorDataInf,
    IFAttributorEKFAC,
    IFAttributorExplicit,
    IFAttributorLiSSA,
    RPSAttributor,
    TRAKAttributor,
    TracInAttributor,
)

DT = torch.float64


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(5, 5)
        self.body = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.drop(torch.tanh(self.bn(self.body(x + 0.1 * self.frozen(x))))))


def make_model():
    torch.manual_seed(11)
    model = Net().double()
    for p in model.frozen.parameters():
        p.requires_grad_(False)
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2.0)
    model.train()
    model.head.register_forward_hook(lambda module, args, out: None)
    return model


def data():
    g = torch.Generator().manual_seed(12)
    x, y = torch.randn(24, 5, generator=g, dtype=DT), torch.randint(0, 3, (24,), generator=g)
    return DataLoader(TensorDataset(x[:16], y[:16]), batch_size=5), DataLoader(TensorDataset(x[16:], y[16:]),
                                                                                batch_size=4)


def snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
        torch.get_rng_state(),
    )


def assert_same(before, after):
    assert before[0].keys() == after[0].keys()
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), f"{k} changed"
    assert before[1:4] == after[1:4]
    assert torch.equal(before[4], after[4]), "the global RNG state changed"


def task_for(model, margin=False):
    def loss(params, batch):
        logits = functional_call(model, params, (batch[0],))
        if margin:  # TRAK's output to explain
            p = torch.softmax(logits, -1).gather(1, batch[1][:, None]).squeeze(1)
            return (torch.log(p) - torch.log1p(-p)).sum()
        return nn.functional.cross_entropy(logits, batch[1])

    checkpoint = {k: v.clone() * (0.9 if v.is_floating_point() else 1) for k, v in model.state_dict().items()}
    return AttributionTask(loss, model, checkpoint)


def probability(model):
    def p(params, batch):
        logits = functional_call(model, params, (batch[0],))
        return torch.softmax(logits, -1).gather(1, batch[1][:, None]).squeeze(1)

    return p


def rps_task(model):
    return AttributionTask(lambda params, batch: None, model, model.state_dict(),
                           target_func=lambda logits, labels: nn.functional.cross_entropy(logits, labels))


BUILDERS = {
    "explicit": lambda m: IFAttributorExplicit(task_for(m), regularization=1e-2, show_progress=False),
    "cg": lambda m: IFAttributorCG(task_for(m), regularization=1e-2, max_iter=50, show_progress=False),
    "lissa": lambda m: IFAttributorLiSSA(task_for(m), recursion_depth=20, damping=0.1, scaling=50.0,
                                         show_progress=False),
    "datainf": lambda m: IFAttributorDataInf(task_for(m), show_progress=False),
    "arnoldi": lambda m: IFAttributorArnoldi(task_for(m), proj_dim=5, max_iter=10, regularization=1e-2,
                                             show_progress=False),
    "ekfac": lambda m: IFAttributorEKFAC(task_for(m), damping=1e-2, show_progress=False),
    "tracin": lambda m: TracInAttributor(task_for(m), [1.0], normalized_grad=False, show_progress=False),
    "grad-cos": lambda m: TracInAttributor(task_for(m), [1.0], normalized_grad=True,
                                           projector_kwargs={"proj_dim": 4}, show_progress=False),
    "trak": lambda m: TRAKAttributor(task_for(m, margin=True), probability(m), projector_kwargs={"proj_dim": 8},
                                     regularization=1e-2, show_progress=False),
    "rps": lambda m: RPSAttributor(rps_task(m), "head", epoch=50),
}


def call(attributor, method, train, test):
    if method == "cache":
        return attributor.cache(train)
    if method == "attribute":
        return attributor.attribute(test) if isinstance(attributor, TRAKAttributor) else \
            attributor.attribute(train, test)
    if method == "self_attribute":
        return attributor.self_attribute(train)
    return attributor.topk(test, 3, train_dataloader=train)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_public_call_leaves_the_model_and_rng_untouched(name):
    model = make_model()
    train, test = data()
    before = snapshot(model)
    attributor = BUILDERS[name](model)  # reads the task's checkpoint, which differs from the model's weights
    assert_same(before, snapshot(model))
    results = {}
    for method in ("cache", "attribute", "self_attribute", "topk"):
        before = snapshot(model)
        results[method] = call(attributor, method, train, test)
        assert_same(before, snapshot(model))
    again = call(attributor, "attribute", train, test)
    torch.testing.assert_close(again, results["attribute"])  # no Dropout draw: deterministic
    # The same call on a model already in eval mode gives the same scores.
    reference = BUILDERS[name](make_model().eval())
    reference.cache(train)
    torch.testing.assert_close(call(reference, "attribute", train, test), results["attribute"])


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_a_call_that_raises_leaves_the_model_untouched_and_nothing_cached(name):
    model = make_model()
    train, _ = data()
    bad = DataLoader(TensorDataset(torch.randn(4, 7, dtype=DT), torch.zeros(4, dtype=torch.long)), batch_size=2)
    attributor = BUILDERS[name](model)
    _, test = data()
    before = snapshot(model)
    with pytest.raises(RuntimeError):  # training inputs of the wrong width: fails inside the model
        if isinstance(attributor, TRAKAttributor):
            attributor.self_attribute(bad)
        elif isinstance(attributor, IFAttributorArnoldi):  # refuses to attribute before cache()
            attributor.cache(bad)
        else:
            attributor.attribute(bad, test)
    assert_same(before, snapshot(model))
    assert attributor.full_train_dataloader is None  # nothing half-cached
    attributor.cache(train)  # and it recovers
    with pytest.raises(RuntimeError):
        call(attributor, "attribute", train, bad)
    assert_same(before, snapshot(model))
    assert attributor.full_train_dataloader is train


@pytest.mark.parametrize("name", [n for n in sorted(BUILDERS) if n != "rps"])
def test_frozen_parameters_are_left_out(name):
    attributor = BUILDERS[name](make_model())
    assert not any(n.startswith("frozen.") for n in attributor.names)
    assert any(n.startswith("body.") for n in attributor.names)


def test_naming_a_frozen_layer_includes_it():
    attributor = TracInAttributor(task_for(make_model()), [1.0], False, layer_name=["frozen", "head"],
                                  show_progress=False)
    assert attributor.names == ["frozen.weight", "frozen.bias", "head.weight", "head.bias"]
