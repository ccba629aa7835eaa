"""dattri's attributors on the benchmark's exact inputs, for the side-by-side rows (when dattri is installed).

Same model, fitted parameters, checkpoints, loaders and hyperparameters as ours;
dattri's functions see one example without its batch dimension, so the losses here
add it back. dattri is never a dependency: :func:`available` says whether it imports.
"""

from __future__ import annotations

import copy
import importlib.util
from typing import Any, Dict

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .digits import margin_and_probability
from .methods import loaders
from .settings import Setting, states

NAMES = ("explicit", "cg", "lissa", "datainf", "arnoldi", "ekfac", "tracin", "grad-dot", "grad-cos", "trak-1", "rps")


def available() -> bool:
    return importlib.util.find_spec("dattri") is not None


def _one(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """One example gets its batch dimension back; a batch (some dattri methods pass batches) stays as it is."""
    return (x.unsqueeze(0), y.unsqueeze(0)) if y.dim() == 0 else (x, y)


def _loss(model: nn.Module):
    def loss(params, data):
        x, y = _one(*data)
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return loss


def attribute(setting: Setting, name: str, hyper: Dict[str, Any]) -> Tensor:
    """dattri's scores ``(n_train, n_test)`` for method ``name`` with our hyperparameters."""
    from dattri.algorithm import influence_function as inf
    from dattri.algorithm.rps import RPSAttributor
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    model = copy.deepcopy(setting.model)  # dattri's EK-FAC leaves forward hooks on the model it is given
    train, test = loaders(setting)
    one = states(setting, [setting.params])[0]
    task = AttributionTask(loss_func=_loss(model), model=model, checkpoints=one)
    influence = {"explicit": (inf.IFAttributorExplicit, {}), "cg": (inf.IFAttributorCG, {"max_iter": 20}),
                 "lissa": (inf.IFAttributorLiSSA, {"batch_size": 50, "recursion_depth": 100}),
                 "datainf": (inf.IFAttributorDataInf, {}),
                 "arnoldi": (inf.IFAttributorArnoldi, {"proj_dim": 100, "max_iter": 100}),
                 "ekfac": (inf.IFAttributorEKFAC, {})}
    if name in influence:
        cls, fixed = influence[name]
        kwargs = {**fixed, **{k: v for k, v in hyper.items() if k != "fisher"}}
        attributor = cls(task, **kwargs)
        attributor.cache(train)
        return attributor.attribute(train, test).detach()
    if name in ("tracin", "grad-dot", "grad-cos"):
        checkpoints = states(setting, setting.checkpoints if name == "tracin" else [setting.params])
        task = AttributionTask(loss_func=_loss(model), model=model, checkpoints=checkpoints)
        attributor = TracInAttributor(task, torch.ones(len(checkpoints)), normalized_grad=name == "grad-cos")
        return attributor.attribute(train, test).detach()
    if name == "trak-1":
        margin, probability = margin_and_probability(model, per_example=True)
        task = AttributionTask(loss_func=margin, model=model, checkpoints=one)
        attributor = TRAKAttributor(task, probability, projector_kwargs={"proj_dim": hyper["proj_dim"]},
                                    regularization=hyper.get("regularization", 0.0))
        attributor.cache(train)
        return attributor.attribute(test).detach()
    if name == "rps":
        task = AttributionTask(loss_func=_loss(model), model=model, checkpoints=one,
                               target_func=nn.functional.cross_entropy)
        attributor = RPSAttributor(task, setting.final_layer, **hyper)
        attributor.cache(train)
        return attributor.attribute(train, test).detach()
    raise ValueError(f"name: dattri has no counterpart of {name!r}")
