"""dattri's attributors on the benchmark's exact inputs, for the side-by-side rows (when dattri is installed).

Same model, fitted parameters, checkpoints, loaders and hyperparameters as ours;
dattri's functions see one example without its batch dimension, so the losses here
add it back. Where dattri needs a user's workaround to run at all, the harness applies
it, as a user would:

- inputs are cast back to the model's dtype and labels to integers (dattri's LiSSA
  hands the loss float32 inputs and float labels);
- torch's default dtype is the model's while dattri runs (its LiSSA, Arnoldi and
  DataInf create float32 buffers and fail on a float64 model);
- Arnoldi gets as many iterations as ours, 1.5 per eigenpair kept (with as many
  iterations as eigenpairs, its own default of 100 and 100 included, its scores came
  out NaN on logreg-sgd);
- where our DataInf uses the paper's per-layer damping (``regularization=0.0``),
  dattri gets its own fallback, 0.1 (its literal 0.0 divides by zero);
- where our EK-FAC uses the damping heuristic, dattri gets its value for the empirical
  Fisher (one layer only: dattri takes one damping for all);
- a model that is one bare ``nn.Linear`` is wrapped in ``nn.Sequential`` (dattri's
  EK-FAC and RPS find no layer in it otherwise).

Two of our choices have no dattri counterpart and are dropped: EK-FAC's ``fisher``
(dattri's is the empirical Fisher) and RPS's ``fit_to`` (dattri's always fits the
model's predictions, so its RPS row compares surrogates where ours fits the labels).

dattri is never a dependency: :func:`available` says whether it imports.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
from typing import Any, Dict

import torch
from torch import Tensor, nn
from torch.func import functional_call

from attrib_core import ekfac

from .digits import cross_entropy, margin_and_probability
from .methods import METHODS, arnoldi_iterations, loaders
from .settings import Setting, states

NAMES = tuple(name for name, method in METHODS.items() if method.dattri)  # the registry's methods dattri also has


def available() -> bool:
    return importlib.util.find_spec("dattri") is not None


def _one(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """One example gets its batch dimension back; a batch (some dattri methods pass batches) stays as it is."""
    return (x.unsqueeze(0), y.unsqueeze(0)) if y.dim() == 0 else (x, y)


def _loss(model: nn.Module):
    def loss(params, data):
        x, y = _one(*data)
        x = x.to(next(iter(params.values())).dtype)  # dattri's LiSSA casts the inputs to float32
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y.long())

    return loss


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def attribute(setting: Setting, name: str, hyper: Dict[str, Any]) -> Tensor:
    """dattri's scores ``(n_train, n_test)`` for method ``name`` with our hyperparameters."""
    with _default_dtype(next(setting.model.parameters()).dtype):
        return _attribute(setting, name, hyper)


def _dattri_hyper(setting: Setting, name: str, hyper: Dict[str, Any]) -> Dict[str, Any]:
    """Our hyperparameters in dattri's terms (see the module's docstring)."""
    hyper = {k: v for k, v in hyper.items() if k not in ("fisher", "fit_to")}
    if name == "arnoldi":
        hyper.setdefault("max_iter", arnoldi_iterations(hyper["proj_dim"]))  # the budget ours has
    if name == "datainf" and hyper.get("regularization") == 0.0:
        hyper["regularization"] = None  # dattri's own fallback, 0.1
    if name == "ekfac" and hyper.get("damping") == "heuristic":
        hyper["damping"] = _heuristic_damping(setting)
    return hyper


def _heuristic_damping(setting: Setting) -> float:
    """Our ``damping="heuristic"`` as the one number dattri's EK-FAC takes (its empirical Fisher's)."""
    batches = [(x, y) for x, y in loaders(setting)[0]]
    per_layer = ekfac(setting.model, cross_entropy(setting.model), setting.params, batches).heuristic_damping()
    if len(per_layer) != 1:
        raise ValueError(f"damping: the heuristic gives one value per layer ({len(per_layer)} layers); "
                         "dattri's EK-FAC takes one for all")
    return per_layer[0]


def _attribute(setting: Setting, name: str, hyper: Dict[str, Any]) -> Tensor:
    from dattri.algorithm import influence_function as inf
    from dattri.algorithm.rps import RPSAttributor
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    model = copy.deepcopy(setting.model)  # dattri's EK-FAC leaves forward hooks on the model it is given
    prefix, final_layer = "", setting.final_layer
    if isinstance(model, nn.Linear):  # dattri's EK-FAC and RPS find only named submodules; a bare layer has none
        model, prefix, final_layer = nn.Sequential(model), "0.", "0"

    def named(params_list):
        return [{prefix + k: v for k, v in p.items()} for p in states(setting, params_list)]

    train, test = loaders(setting)
    one = named([setting.params])[0]
    task = AttributionTask(loss_func=_loss(model), model=model, checkpoints=one)
    method = METHODS[name] if name in NAMES else None
    if method is not None and method.attributor.startswith("IFAttributor"):  # the class of the same name, ours' fixed
        kwargs = {**method.fixed, **_dattri_hyper(setting, name, hyper)}
        attributor = getattr(inf, method.attributor)(task, **kwargs)
        attributor.cache(train)
        return attributor.attribute(train, test).detach()
    if name in ("tracin", "grad-dot", "grad-cos"):
        checkpoints = named(setting.checkpoints if name == "tracin" else [setting.params])
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
        attributor = RPSAttributor(task, final_layer, **_dattri_hyper(setting, name, hyper))
        attributor.cache(train)
        return attributor.attribute(train, test).detach()
    raise ValueError(f"name: dattri has no counterpart of {name!r}")
