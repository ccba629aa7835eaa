"""kronfluence's EK-FAC and K-FAC influence on the benchmark's exact inputs (when kronfluence is installed).

Same model, fitted parameters and data as ours: a deep copy of ``setting.model``
with ``setting.params`` loaded (kronfluence replaces its layers by tracked
wrappers; the copy is put inside an ``nn.Sequential`` so that a bare ``nn.Linear`` is
wrapped too), and the datasets and batch size of :func:`benchmarks.methods.loaders`.
The training loss is the summed cross-entropy; with ``fisher="sampled"`` (the
default, as in kronfluence's own examples) its labels are drawn from the model's
predictive distribution, a seeded draw in every pass, so the factors approximate
the true Fisher. The measurement is the test example's cross-entropy.

Sign: kronfluence's pairwise score is ``∇m(z_test)ᵀ (F̂ + λI)⁻¹ ∇L(z_train)`` with
``m`` the test loss, positive when up-weighting the training example lowers the
test loss (Grosse et al., 2023) -- our convention, so the scores are returned as
they are (transposed to ``(n_train, n_test)``).

Damping: ``hyper["damping"]`` when given, else kronfluence's heuristic (``damping_factor=None``:
0.1 times the mean eigenvalue, per layer). kronfluence's own default would be ``1e-8``.

Precision: every factor, gradient, preconditioning and score dtype kronfluence
exposes is set to float64 (it casts activations and output gradients to them, so
this works for the float64 logistic regression and the float32 MLP alike).

kronfluence is never a dependency: :func:`available` says whether it imports, and
its outputs go to a temporary directory removed afterwards.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import tempfile
import warnings
from typing import Any, Dict

import torch
from torch import Tensor, nn

from .methods import METHODS, loaders
from .settings import Setting, states

# kronfluence's strategies, each with the registry's method it is run beside (its K-FAC beside our EK-FAC: the
# same factors without the eigenvalue correction).
OURS = {strategy: name for name, method in METHODS.items() for strategy in method.kronfluence}
NAMES = tuple(OURS)


def available() -> bool:
    return importlib.util.find_spec("kronfluence") is not None


def _task(seed: int):
    from kronfluence.task import Task

    class CrossEntropy(Task):
        """Summed cross-entropy for training (labels sampled for the true Fisher) and per test example."""

        def __init__(self) -> None:
            self.generator = torch.Generator().manual_seed(seed)

        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Tensor:
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    probabilities = torch.softmax(logits.detach().double(), dim=-1).cpu()
                    y = torch.multinomial(probabilities, 1, generator=self.generator).flatten().to(y.device)
            return nn.functional.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
            x, y = batch
            return nn.functional.cross_entropy(model(x), y, reduction="sum")

    return CrossEntropy()


def attribute(setting: Setting, name: str, hyper: Dict[str, Any]) -> Tensor:
    """kronfluence's scores ``(n_train, n_test)`` for ``name`` in :data:`NAMES`.

    ``hyper`` may hold ``damping`` (absent: kronfluence's heuristic), ``fisher``
    (``"sampled"``, the default, or ``"empirical"``) and ``seed`` (for the sampled labels).
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    if name not in NAMES:
        raise ValueError(f"name: expected one of {NAMES}, got {name!r}")
    fisher = hyper.get("fisher", "sampled")
    if fisher not in ("empirical", "sampled"):
        raise ValueError(f"fisher: expected 'empirical' or 'sampled', got {fisher!r}")
    model = copy.deepcopy(setting.model)
    model.load_state_dict(states(setting, [setting.params])[0])
    task = _task(hyper.get("seed", 0))
    # kronfluence wraps the children of the model it is given; a bare nn.Linear (logreg) would wrap itself.
    model = prepare_model(nn.Sequential(model), task)
    train, test = loaders(setting)
    f64 = torch.float64
    factor_args = FactorArguments(
        strategy=name, use_empirical_fisher=fisher == "empirical", activation_covariance_dtype=f64,
        gradient_covariance_dtype=f64, eigendecomposition_dtype=f64, per_sample_gradient_dtype=f64,
        lambda_dtype=f64)
    score_args = ScoreArguments(
        damping_factor=hyper.get("damping"), per_sample_gradient_dtype=f64, precondition_dtype=f64,
        score_dtype=f64, query_gradient_svd_dtype=f64)
    logger = logging.getLogger("kronfluence")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its INFO lines; passing log_level to Analyzer would reset the root logger
    try:
        with tempfile.TemporaryDirectory(prefix="kronfluence-") as output, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # its torch.cuda.amp.GradScaler, even on the CPU
            analyzer = Analyzer("benchmark", model, task, cpu=True, disable_tqdm=True, output_dir=output)
            analyzer.fit_all_factors("factors", train.dataset, per_device_batch_size=train.batch_size,
                                     factor_args=factor_args, overwrite_output_dir=True)
            analyzer.compute_pairwise_scores("scores", "factors", test.dataset, train.dataset,
                                             per_device_query_batch_size=test.batch_size,
                                             per_device_train_batch_size=train.batch_size,
                                             score_args=score_args, overwrite_output_dir=True)
            scores = analyzer.load_pairwise_scores("scores")["all_modules"]  # (n_test, n_train)
    finally:
        logger.setLevel(level)
    return scores.T.contiguous()
