"""Every attribution method of the benchmark, with its shipped defaults and the grid it is tuned over.

:data:`METHODS` is the benchmark's one registry of methods: ``benchmarks.run`` runs and
tunes its entries, and the side-by-side harnesses take their names from it
(``benchmarks.attributors``: the influence functions; ``benchmarks.dattri_methods``: the
entries with ``dattri=True``; ``benchmarks.kronfluence_methods``: the ``kronfluence``
strategies of an entry). Each method builds an ``attrib_torch`` attributor for a
:class:`~benchmarks.settings.Setting` and gives training-by-test scores (a positive
score: the training image helps the test prediction) and self-influence scores.

The hyperparameters that ship for a setting are read from ``benchmarks/tuned.json``:
the grid points with the best LDS on the validation models (``python -m benchmarks.run
--tune``), laid over the generic defaults here; they never see the models the reported
LDS uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import attrib_torch as at

from .digits import cross_entropy, margin_and_probability
from .digits_influence import loaders as split_loaders
from .settings import SETTINGS, Setting, states

BATCH = 250
TUNED = Path(__file__).resolve().parent / "tuned.json"


class Method(NamedTuple):
    attributor: str  # the attrib_torch class it builds; dattri's counterpart, where there is one, has the same name
    build: Callable[["Method", Setting, Dict[str, Any]], Any]  # (this entry, setting, hyperparameters) -> cached
    defaults: Dict[str, Any]
    grid: Dict[str, List[Any]]
    fixed: Dict[str, Any] = {}  # constructor arguments that are not tuned (dattri's counterpart gets them too)
    narrow: Dict[str, Dict[str, List[Any]]] = {}  # per setting: shorter value lists where a grid point is costly
    tuned: Dict[str, Dict[str, Any]] = {}  # per setting: the validation winners of ``--tune``, from tuned.json
    dattri: bool = False  # dattri has a counterpart, run side by side by benchmarks.dattri_methods
    kronfluence: Tuple[str, ...] = ()  # kronfluence's strategies for the same estimate (benchmarks.kronfluence_methods)

    def make(self, setting: Setting, hyper: Dict[str, Any]):
        """The attributor with ``hyper`` on the setting, its training data cached."""
        return self.build(self, setting, hyper)

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


def _influence(method: Method, setting: Setting, hyper: Dict[str, Any]):
    cls = getattr(at, method.attributor)
    attributor = cls(_task(setting), show_progress=False, **method.fixed, **hyper)
    attributor.cache(loaders(setting)[0])
    return attributor


def arnoldi_iterations(proj_dim: int) -> int:
    """Krylov iterations for ``proj_dim`` eigenpairs: half as many again, so the kept ones have converged.

    The dattri side by side gives its Arnoldi the same budget (with no more iterations
    than eigenpairs its scores are NaN)."""
    return proj_dim * 3 // 2


def _arnoldi(method: Method, setting: Setting, hyper: Dict[str, Any]):
    """Arnoldi with :func:`arnoldi_iterations` Krylov iterations, unless ``max_iter`` says otherwise."""
    return _influence(method, setting, {"max_iter": arnoldi_iterations(hyper["proj_dim"]), **hyper})


def _tracin(which: str):
    def build(method: Method, setting: Setting, hyper: Dict[str, Any]):
        checkpoints = setting.checkpoints if which == "tracin" else [setting.params]
        attributor = getattr(at, method.attributor)(_task(setting, checkpoints), [1.0] * len(checkpoints),
                                                    normalized_grad=which == "grad-cos", show_progress=False)
        attributor.cache(loaders(setting)[0])
        return attributor

    return build


def _trak(models: int):
    def build(method: Method, setting: Setting, hyper: Dict[str, Any]):
        members = setting.ensemble[:models]
        if len(members) < models:
            raise ValueError(f"trak-{models}: the setting has {len(setting.ensemble)} trained models; "
                             f"make it with ensemble >= {models}")
        margin, probability = margin_and_probability(setting.model)
        task = _task(setting, members, loss=margin)
        hyper = dict(hyper)
        proj_dim = hyper.pop("proj_dim")
        attributor = getattr(at, method.attributor)(task, probability, projector_kwargs={"proj_dim": proj_dim},
                                                    show_progress=False, **hyper)
        attributor.cache(loaders(setting)[0])
        return attributor

    return build


def _rps(method: Method, setting: Setting, hyper: Dict[str, Any]):
    task = at.AttributionTask(cross_entropy(setting.model), setting.model, states(setting, [setting.params]),
                              target_func=nn.functional.cross_entropy)
    attributor = getattr(at, method.attributor)(task, setting.final_layer, **hyper)
    attributor.cache(loaders(setting)[0])
    return attributor


DAMPINGS = [1e-4, 1e-3, 1e-2, 1e-1]
TRAK_GRID = {"proj_dim": [256, 512, 2048], "regularization": [0.0, 1e-2, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5]}
_METHODS: Dict[str, Method] = {
    "explicit": Method("IFAttributorExplicit", _influence, {"regularization": 1e-3}, {"regularization": DAMPINGS},
                       dattri=True),
    "cg": Method("IFAttributorCG", _influence, {"regularization": 1e-3}, {"regularization": DAMPINGS},
                 fixed={"max_iter": 20}, dattri=True),
    "lissa": Method("IFAttributorLiSSA", _influence, {"damping": 1e-3, "scaling": 5.0, "recursion_depth": 100},
                    {"damping": [1e-4, 1e-3, 1e-2], "scaling": [5.0, 20.0], "recursion_depth": [100, 1000]},
                    fixed={"batch_size": 50}, dattri=True,
                    # On the CNN one point costs minutes, and scaling 5 diverges there: its batch-50 Hessians
                    # reach λ_max 22 (`python -m benchmarks.minibatch_spectrum --setting cnn`), so scaling must
                    # exceed 11; depth 1000 won on the other L-BFGS settings.
                    narrow={"cnn": {"damping": [1e-4, 1e-3, 1e-2], "scaling": [20.0], "recursion_depth": [1000]}}),
    "arnoldi": Method("IFAttributorArnoldi", _arnoldi, {"regularization": 1e-3, "proj_dim": 100},
                      {"regularization": DAMPINGS, "proj_dim": [100, 200, 400]}, dattri=True),
    "datainf": Method("IFAttributorDataInf", _influence, {"regularization": 0.0},
                      {"regularization": [0.0] + DAMPINGS}, dattri=True),
    "ekfac": Method("IFAttributorEKFAC", _influence, {"damping": 1e-3, "fisher": "sampled"},
                    {"damping": [1e-6, 1e-5] + DAMPINGS + ["heuristic"], "fisher": ["empirical", "sampled"]},
                    dattri=True, kronfluence=("ekfac", "kfac")),
    "tracin": Method("TracInAttributor", _tracin("tracin"), {}, {}, dattri=True),
    "grad-dot": Method("TracInAttributor", _tracin("grad-dot"), {}, {}, dattri=True),
    "grad-cos": Method("TracInAttributor", _tracin("grad-cos"), {}, {}, dattri=True),
    "trak-1": Method("TRAKAttributor", _trak(1), {"proj_dim": 512, "regularization": 1.0}, TRAK_GRID, dattri=True),
    "trak-5": Method("TRAKAttributor", _trak(5), {"proj_dim": 512, "regularization": 1.0}, TRAK_GRID),
    "trak-10": Method("TRAKAttributor", _trak(10), {"proj_dim": 512, "regularization": 1.0}, TRAK_GRID),
    # 2,048 dimensions won for every smaller ensemble on every setting; a point costs 50 models' gradients.
    "trak-50": Method("TRAKAttributor", _trak(50), {"proj_dim": 2048, "regularization": 1.0},
                      {"proj_dim": [2048], "regularization": TRAK_GRID["regularization"]}),
    "rps": Method("RPSAttributor", _rps, {"l2_strength": 1e-3, "epoch": 300, "fit_to": "labels"},
                  {"l2_strength": [1e-4, 1e-3, 1e-2], "fit_to": ["labels", "predictions"]}, dattri=True),
}


def read_tuned(methods: Iterable[str], settings: Iterable[str] = SETTINGS, path: Path = TUNED
               ) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """``path``'s tuned values, method by method and setting by setting; a method or setting not named is refused."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("tuned"), dict) or set(data) - {"about", "notes", "tuned"}:
        raise ValueError(f"{path}: expected an object with 'tuned' (and optionally 'about', 'notes'), got keys "
                         f"{sorted(data) if isinstance(data, dict) else type(data).__name__}")
    methods, settings = list(methods), list(settings)
    for name, per_setting in data["tuned"].items():
        if name not in methods:
            raise ValueError(f"{path}: unknown method {name!r}; expected one of {methods}")
        if not isinstance(per_setting, dict):
            raise ValueError(f"{path}: {name}: expected an object of settings, got {per_setting!r}")
        for setting, hyper in per_setting.items():
            if setting not in settings:
                raise ValueError(f"{path}: {name}: unknown setting {setting!r}; expected one of {settings}")
            if not isinstance(hyper, dict):
                raise ValueError(f"{path}: {name}/{setting}: expected an object of hyperparameters, got {hyper!r}")
    return data["tuned"]


_TUNED = read_tuned(_METHODS)
# The registry: every method of the benchmark by name, its tuned values from tuned.json.
METHODS: Dict[str, Method] = {name: m._replace(tuned=_TUNED.get(name, {})) for name, m in _METHODS.items()}


def attribute(setting: Setting, name: str, hyper: Dict[str, Any]) -> Tensor:
    """Scores ``(n_train, n_test)`` of method ``name`` with ``hyper`` on the setting."""
    attributor = METHODS[name].make(setting, hyper)
    train, test = loaders(setting)
    if isinstance(attributor, at.TRAKAttributor):
        return attributor.attribute(test).detach()
    return attributor.attribute(train, test).detach()


def self_influence(setting: Setting, name: str, hyper: Dict[str, Any], rows: Optional[Tensor] = None) -> Tensor:
    """Self influence of method ``name`` with ``hyper``: of every training image, or of the positions ``rows``.

    The attributor is always built on the whole training set (its Hessian, its
    cached gradients); ``rows`` only chooses whose self influence is computed.
    """
    attributor = METHODS[name].make(setting, hyper)
    train = loaders(setting)[0]
    if rows is not None:
        d = setting.data
        train = DataLoader(TensorDataset(d.x_train[rows], d.y_train[rows]), batch_size=BATCH, shuffle=False)
    return attributor.self_attribute(train).detach()
