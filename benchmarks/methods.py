"""Every attribution method of the benchmark, with its shipped defaults and the grid it is tuned over.

Each method builds an ``attrib_torch`` attributor for a :class:`~benchmarks.settings.Setting`
and gives training-by-test scores (a positive score: the training image helps the test
prediction) and self-influence scores. Defaults are the grid points with the best LDS
on the validation models (``python -m benchmarks.run --tune``); they never see the
models the reported LDS uses.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, NamedTuple, Optional

from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import attrib_torch as at

from .digits import cross_entropy, margin_and_probability
from .digits_influence import loaders as split_loaders
from .settings import Setting, states

BATCH = 250


class Method(NamedTuple):
    build: Callable[[Setting, Dict[str, Any]], Any]  # -> a cached attributor
    defaults: Dict[str, Any]
    grid: Dict[str, List[Any]]
    tuned: Dict[str, Dict[str, Any]] = {}  # per setting: the validation winners of ``--tune`` (see RESULTS.md)
    narrow: Dict[str, Dict[str, List[Any]]] = {}  # per setting: shorter value lists where a grid point is costly

    def settings_for(self, setting: str) -> Dict[str, Any]:
        """The hyperparameters that ship for ``setting``: its tuned values over the generic defaults."""
        return {**self.defaults, **self.tuned.get(setting, {})}

    def grid_for(self, setting: str) -> Dict[str, List[Any]]:
        """The values ``--tune`` searches on ``setting``: the grid, with that setting's narrower lists."""
        return {**self.grid, **self.narrow.get(setting, {})}


def loaders(setting: Setting):
    """Sequential (train, test) loaders of the setting's data, batches of 250."""
    return split_loaders(setting.data, BATCH)


def _task(setting: Setting, checkpoints=None, loss=None) -> at.AttributionTask:
    chosen = states(setting, checkpoints or [setting.params])
    return at.AttributionTask(loss or cross_entropy(setting.model), setting.model, chosen)


def _influence(cls, **fixed):
    def build(setting: Setting, hyper: Dict[str, Any]):
        attributor = cls(_task(setting), show_progress=False, **fixed, **hyper)
        attributor.cache(loaders(setting)[0])
        return attributor

    return build


def arnoldi_iterations(proj_dim: int) -> int:
    """Krylov iterations for ``proj_dim`` eigenpairs: half as many again, so the kept ones have converged.

    The dattri side by side gives its Arnoldi the same budget (with no more iterations
    than eigenpairs its scores are NaN)."""
    return proj_dim * 3 // 2


def _arnoldi(setting: Setting, hyper: Dict[str, Any]):
    """Arnoldi with :func:`arnoldi_iterations` Krylov iterations, unless ``max_iter`` says otherwise."""
    return _influence(at.IFAttributorArnoldi)(setting, {"max_iter": arnoldi_iterations(hyper["proj_dim"]), **hyper})


def _tracin(which: str):
    def build(setting: Setting, hyper: Dict[str, Any]):
        checkpoints = setting.checkpoints if which == "tracin" else [setting.params]
        attributor = at.TracInAttributor(_task(setting, checkpoints), [1.0] * len(checkpoints),
                                         normalized_grad=which == "grad-cos", show_progress=False)
        attributor.cache(loaders(setting)[0])
        return attributor

    return build


def _trak(models: int):
    def build(setting: Setting, hyper: Dict[str, Any]):
        members = setting.ensemble[:models]
        if len(members) < models:
            raise ValueError(f"trak-{models}: the setting has {len(setting.ensemble)} trained models; "
                             f"make it with ensemble >= {models}")
        margin, probability = margin_and_probability(setting.model)
        task = _task(setting, members, loss=margin)
        hyper = dict(hyper)
        proj_dim = hyper.pop("proj_dim")
        attributor = at.TRAKAttributor(task, probability, projector_kwargs={"proj_dim": proj_dim},
                                       show_progress=False, **hyper)
        attributor.cache(loaders(setting)[0])
        return attributor

    return build


def _rps(setting: Setting, hyper: Dict[str, Any]):
    task = at.AttributionTask(cross_entropy(setting.model), setting.model, states(setting, [setting.params]),
                              target_func=nn.functional.cross_entropy)
    attributor = at.RPSAttributor(task, setting.final_layer, **hyper)
    attributor.cache(loaders(setting)[0])
    return attributor


DAMPINGS = [1e-4, 1e-3, 1e-2, 1e-1]
TRAK_GRID = {"proj_dim": [256, 512, 2048], "regularization": [0.0, 1e-2, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5]}
METHODS: Dict[str, Method] = {
    "explicit": Method(_influence(at.IFAttributorExplicit), {"regularization": 1e-3}, {"regularization": DAMPINGS},
                       {"logreg": {"regularization": 1e-3}, "mlp": {"regularization": 1e-4},
                        "cnn": {"regularization": 1e-2}, "logreg-sgd": {"regularization": 1e-1},
                        "mlp-sgd": {"regularization": 1e-1}}),
    "cg": Method(_influence(at.IFAttributorCG, max_iter=20), {"regularization": 1e-3}, {"regularization": DAMPINGS},
                 {"logreg": {"regularization": 1e-3}, "mlp": {"regularization": 1e-3}, "cnn": {"regularization": 1e-3},
                  "logreg-sgd": {"regularization": 1e-1}, "mlp-sgd": {"regularization": 1e-1}}),
    "lissa": Method(_influence(at.IFAttributorLiSSA, batch_size=50), {"damping": 1e-3, "scaling": 5.0,
                                                                     "recursion_depth": 100},
                    {"damping": [1e-4, 1e-3, 1e-2], "scaling": [5.0, 20.0], "recursion_depth": [100, 1000]},
                    {"logreg": {"damping": 1e-4, "scaling": 5.0, "recursion_depth": 1000},
                     "mlp": {"damping": 1e-4, "scaling": 5.0, "recursion_depth": 1000},
                     "logreg-sgd": {"damping": 1e-2, "scaling": 5.0, "recursion_depth": 100},
                     "mlp-sgd": {"damping": 1e-2, "scaling": 5.0, "recursion_depth": 100},
                     "cnn": {"damping": 1e-4, "scaling": 20.0, "recursion_depth": 1000}},
                    # On the CNN one point costs minutes, and scaling 5 diverges there: its batch-50 Hessians
                    # reach λ_max 22 (`python -m benchmarks.minibatch_spectrum --setting cnn`), so scaling must
                    # exceed 11; depth 1000 won on the other L-BFGS settings.
                    {"cnn": {"damping": [1e-4, 1e-3, 1e-2], "scaling": [20.0], "recursion_depth": [1000]}}),
    "arnoldi": Method(_arnoldi, {"regularization": 1e-3, "proj_dim": 100},
                      {"regularization": DAMPINGS, "proj_dim": [100, 200, 400]},
                      {"logreg": {"regularization": 1e-3, "proj_dim": 400},
                       "mlp": {"regularization": 1e-3, "proj_dim": 400},
                       # tuned and reported with as many iterations as eigenpairs (the earlier convention)
                       "cnn": {"regularization": 1e-4, "proj_dim": 400, "max_iter": 400},
                       "logreg-sgd": {"regularization": 1e-1, "proj_dim": 400},
                       "mlp-sgd": {"regularization": 1e-1, "proj_dim": 400}}),
    "datainf": Method(_influence(at.IFAttributorDataInf), {"regularization": 0.0},
                      {"regularization": [0.0] + DAMPINGS},
                      {"logreg": {"regularization": 0.0}, "mlp": {"regularization": 0.0},
                       "mlp-sgd": {"regularization": 1e-2}}),
    "ekfac": Method(_influence(at.IFAttributorEKFAC), {"damping": 1e-3, "fisher": "sampled"},
                    {"damping": [1e-6, 1e-5] + DAMPINGS + ["heuristic"], "fisher": ["empirical", "sampled"]},
                    {"logreg": {"damping": "heuristic", "fisher": "sampled"},
                     "mlp": {"damping": 1e-5, "fisher": "empirical"},
                     "cnn": {"damping": 1e-6, "fisher": "sampled"},
                     "logreg-sgd": {"damping": 1e-2, "fisher": "empirical"},
                     "mlp-sgd": {"damping": 1e-3, "fisher": "empirical"}}),
    "tracin": Method(_tracin("tracin"), {}, {}),
    "grad-dot": Method(_tracin("grad-dot"), {}, {}),
    "grad-cos": Method(_tracin("grad-cos"), {}, {}),
    "trak-1": Method(_trak(1), {"proj_dim": 512, "regularization": 1.0}, TRAK_GRID,
                     {"logreg": {"proj_dim": 2048, "regularization": 10.0},
                      "mlp": {"proj_dim": 2048, "regularization": 100.0},
                      "cnn": {"proj_dim": 2048, "regularization": 100.0},
                      "logreg-sgd": {"proj_dim": 2048, "regularization": 1e3},
                      "mlp-sgd": {"proj_dim": 2048, "regularization": 1e3}}),
    "trak-5": Method(_trak(5), {"proj_dim": 512, "regularization": 1.0}, TRAK_GRID,
                     {"mlp": {"proj_dim": 2048, "regularization": 100.0},
                      "cnn": {"proj_dim": 2048, "regularization": 100.0},
                      "logreg-sgd": {"proj_dim": 2048, "regularization": 1e3},
                      "mlp-sgd": {"proj_dim": 2048, "regularization": 1e3}}),
    "trak-10": Method(_trak(10), {"proj_dim": 512, "regularization": 1.0}, TRAK_GRID,
                      {"mlp": {"proj_dim": 2048, "regularization": 100.0},
                       "cnn": {"proj_dim": 2048, "regularization": 100.0},
                       "logreg-sgd": {"proj_dim": 2048, "regularization": 1e3},
                       "mlp-sgd": {"proj_dim": 2048, "regularization": 1e3}}),
    # 2,048 dimensions won for every smaller ensemble on every setting; a point costs 50 models' gradients.
    "trak-50": Method(_trak(50), {"proj_dim": 2048, "regularization": 1.0},
                      {"proj_dim": [2048], "regularization": TRAK_GRID["regularization"]},
                      {"mlp": {"proj_dim": 2048, "regularization": 100.0},
                       "logreg-sgd": {"proj_dim": 2048, "regularization": 1e3},
                       "mlp-sgd": {"proj_dim": 2048, "regularization": 1e3}}),
    "rps": Method(_rps, {"l2_strength": 1e-3, "epoch": 300, "fit_to": "labels"},
                  {"l2_strength": [1e-4, 1e-3, 1e-2], "fit_to": ["labels", "predictions"]},
                  {"logreg": {"l2_strength": 1e-3, "fit_to": "labels"},
                   "mlp": {"l2_strength": 1e-3, "fit_to": "predictions"},
                   "cnn": {"l2_strength": 1e-3, "fit_to": "predictions"},
                   "logreg-sgd": {"l2_strength": 1e-2, "fit_to": "predictions"},
                   "mlp-sgd": {"l2_strength": 1e-3, "fit_to": "predictions"}}),
}


def attribute(setting: Setting, name: str, hyper: Dict[str, Any]) -> Tensor:
    """Scores ``(n_train, n_test)`` of method ``name`` with ``hyper`` on the setting."""
    attributor = METHODS[name].build(setting, hyper)
    train, test = loaders(setting)
    if isinstance(attributor, at.TRAKAttributor):
        return attributor.attribute(test).detach()
    return attributor.attribute(train, test).detach()


def self_influence(setting: Setting, name: str, hyper: Dict[str, Any], rows: Optional[Tensor] = None) -> Tensor:
    """Self influence of method ``name`` with ``hyper``: of every training image, or of the positions ``rows``.

    The attributor is always built on the whole training set (its Hessian, its
    cached gradients); ``rows`` only chooses whose self influence is computed.
    """
    attributor = METHODS[name].build(setting, hyper)
    train = loaders(setting)[0]
    if rows is not None:
        d = setting.data
        train = DataLoader(TensorDataset(d.x_train[rows], d.y_train[rows]), batch_size=BATCH, shuffle=False)
    return attributor.self_attribute(train).detach()
