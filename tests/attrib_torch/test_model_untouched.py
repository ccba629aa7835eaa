"""Every attributor leaves the user's model and torch's global RNG as it found them, and ignores frozen parameters.

One sweep over every attributor class and every public call (``cache``, ``attribute``,
``self_attribute``, ``topk``), also when the call raises: parameters, buffers,
``training`` flags, ``requires_grad`` flags, hooks and the RNG state are compared
before and after. The model is in train mode with Dropout and BatchNorm, holds a
frozen layer and a user hook, and the task's checkpoint differs from its weights.
"""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from attrib_torch import IFAttributorArnoldi, TRAKAttributor, TracInAttributor
from tests.attrib_torch.attributors_under_test import ATTRIBUTORS_UNDER_TEST, call, data, make_model, task_for

DT = torch.float64


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


@pytest.mark.parametrize("name", sorted(ATTRIBUTORS_UNDER_TEST))
def test_every_public_call_leaves_the_model_and_rng_untouched(name):
    model = make_model()
    train, test = data()
    before = snapshot(model)
    attributor = ATTRIBUTORS_UNDER_TEST[name](model)  # reads the task's checkpoint, which differs from the model's weights
    assert_same(before, snapshot(model))
    results = {}
    for method in ("cache", "attribute", "self_attribute", "topk"):
        before = snapshot(model)
        results[method] = call(attributor, method, train, test)
        assert_same(before, snapshot(model))
    again = call(attributor, "attribute", train, test)
    torch.testing.assert_close(again, results["attribute"])  # no Dropout draw: deterministic
    # The same call on a model already in eval mode gives the same scores.
    reference = ATTRIBUTORS_UNDER_TEST[name](make_model().eval())
    reference.cache(train)
    torch.testing.assert_close(call(reference, "attribute", train, test), results["attribute"])


@pytest.mark.parametrize("name", sorted(ATTRIBUTORS_UNDER_TEST))
def test_a_call_that_raises_leaves_the_model_untouched_and_nothing_cached(name):
    model = make_model()
    train, _ = data()
    bad = DataLoader(TensorDataset(torch.randn(4, 7, dtype=DT), torch.zeros(4, dtype=torch.long)), batch_size=2)
    attributor = ATTRIBUTORS_UNDER_TEST[name](model)
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


@pytest.mark.parametrize("name", [n for n in sorted(ATTRIBUTORS_UNDER_TEST) if n != "rps"])
def test_frozen_parameters_are_left_out(name):
    attributor = ATTRIBUTORS_UNDER_TEST[name](make_model())
    assert not any(n.startswith("frozen.") for n in attributor.names)
    assert any(n.startswith("body.") for n in attributor.names)


def test_naming_a_frozen_layer_includes_it():
    attributor = TracInAttributor(task_for(make_model()), [1.0], False, layer_name=["frozen", "head"],
                                  show_progress=False)
    assert attributor.names == ["frozen.weight", "frozen.bias", "head.weight", "head.bias"]
