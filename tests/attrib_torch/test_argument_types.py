"""Arguments of the wrong type or value are refused by name at construction, before any gradient.

One sweep over the attributors' constructors: a wrong type is a TypeError, a wrong
value a ValueError, and either names the argument.
"""

import pytest
import torch
from torch import nn

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


def make_task():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    calls = []

    def loss(params, batch):
        calls.append(1)
        raise AssertionError("no gradient may be taken before the arguments are checked")

    return AttributionTask(loss, model, model.state_dict()), calls


def prob(params, batch):
    return torch.ones(1)


CASES = [
    (TracInAttributor, {"weight_list": "1.0", "normalized_grad": False}, TypeError, "weight_list"),
    (TracInAttributor, {"weight_list": [1.0, 2.0], "normalized_grad": False}, ValueError, "weight_list"),
    (TracInAttributor, {"weight_list": [1.0], "normalized_grad": "yes"}, TypeError, "normalized_grad"),
    (TRAKAttributor, {"correct_probability_func": prob, "regularization": "0.1"}, TypeError, "regularization"),
    (TRAKAttributor, {"correct_probability_func": prob, "regularization": -1.0}, ValueError, "regularization"),
    (IFAttributorExplicit, {"regularization": "0"}, TypeError, "regularization"),
    (IFAttributorCG, {"max_iter": 2.5}, TypeError, "max_iter"),
    (IFAttributorCG, {"max_iter": 0}, ValueError, "max_iter"),
    (IFAttributorCG, {"tol": None}, TypeError, "tol"),
    (IFAttributorCG, {"mode": "fwd"}, ValueError, "mode"),
    (IFAttributorLiSSA, {"scaling": "50"}, TypeError, "scaling"),
    (IFAttributorLiSSA, {"damping": -0.1}, ValueError, "damping"),
    (IFAttributorLiSSA, {"recursion_depth": 1.5}, TypeError, "recursion_depth"),
    (IFAttributorDataInf, {"regularization": [0.1]}, TypeError, "regularization"),
    (IFAttributorDataInf, {"fim_estimate_data_ratio": 0}, ValueError, "fim_estimate_data_ratio"),
    (IFAttributorArnoldi, {"proj_dim": 2.5}, TypeError, "proj_dim"),
    (IFAttributorArnoldi, {"precompute_data_ratio": "all"}, TypeError, "precompute_data_ratio"),
    (IFAttributorArnoldi, {"proj_dim": 5, "max_iter": 10, "norm_constant": 0.0}, ValueError, "norm_constant"),
    (IFAttributorEKFAC, {"damping": "big"}, ValueError, "damping"),
    (IFAttributorEKFAC, {"fisher": "true"}, ValueError, "fisher"),
    (RPSAttributor, {"final_linear_layer_name": "2", "l2_strength": "0.1"}, TypeError, "l2_strength"),
    (RPSAttributor, {"final_linear_layer_name": "2", "epoch": 0}, ValueError, "epoch"),
    (RPSAttributor, {"final_linear_layer_name": "2", "normalize_preactivate": 1}, TypeError,
     "normalize_preactivate"),
]


@pytest.mark.parametrize("cls,kwargs,error,name", CASES, ids=[f"{c.__name__}-{n}-{e.__name__}"
                                                              for c, _, e, n in CASES])
def test_bad_arguments_are_named(cls, kwargs, error, name):
    task, calls = make_task()
    with pytest.raises(error, match=name):
        cls(task, **kwargs)
    assert not calls


@pytest.mark.parametrize("cls,kwargs", [
    (TracInAttributor, {"weight_list": [1.0, 1.0], "normalized_grad": False}),
    (IFAttributorExplicit, {}),
    (TRAKAttributor, {"correct_probability_func": prob}),
])
def test_every_checkpoint_is_checked_before_the_first_gradient(cls, kwargs):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    calls = []

    def loss(params, batch):
        calls.append(1)
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (batch[0],)), batch[1])

    broken = {k: v for k, v in model.state_dict().items() if k != "2.bias"}
    task = AttributionTask(loss, model, [model.state_dict(), broken])
    data = [(torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1]))]
    with pytest.raises(ValueError, match=r"checkpoints\[1\]"):
        cls(task, **kwargs, show_progress=False).attribute(data, data) if cls is not TRAKAttributor else \
            cls(task, **kwargs, show_progress=False).cache(data)
    assert not calls
