"""The benchmark settings: scikit-learn digits with logistic regression, an MLP and a small CNN.

A setting holds the data (1,000 training / 100 test images by default, seeded), the
model fitted on the full training set by full-batch L-BFGS on the L2-regularised
cross-entropy from a fixed initialisation, checkpoints along that fit (for TracIn),
independently initialised fits (for TRAK's ensembles), and the training recipe the
ground truth retrains with (the same initialisation, so retraining noise is small).
Logistic regression is convex, so its retraining starts from the fitted model (the
same optimum, sooner). The noisy variant flips 10% of the training labels (seeded)
for noisy-label detection.
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .digits import cnn, fit, load_digits_split, mlp, softmax_regression
from .retrain import Data, Params

SETTINGS = ("logreg", "mlp", "cnn")
# Per setting: model constructor, dtype, L2 strength, L-BFGS iterations, the final Linear layer's name, and
# whether retraining starts from the fitted model (the convex case: the optimum is the same from anywhere, only
# sooner) or from the fixed initialisation.
_RECIPES = {
    "logreg": (lambda seed, dtype: softmax_regression(seed=seed, dtype=dtype), torch.float64, 1e-3, 500, "", True),
    "mlp": (lambda seed, dtype: mlp(128, seed=seed, dtype=dtype), torch.float32, 1e-3, 300, "2", False),
    "cnn": (lambda seed, dtype: cnn(16, seed=seed, dtype=dtype), torch.float32, 1e-3, 300, "head", False),
}
CONVEX = {name for name, recipe in _RECIPES.items() if recipe[-1]}
CHECKPOINT_ITERATIONS = (5, 10, 25, 50)  # L-BFGS iterations of the TracIn checkpoints before the final fit


class Setting(NamedTuple):
    name: str
    model: nn.Module
    data: Data
    params: Params
    checkpoints: List[Params]
    ensemble: List[Params]
    train_fn: Callable[[Tensor, Tensor], Params]
    l2: float
    final_layer: str
    key: str
    is_noisy: Optional[Tensor]


def minus_test_loss(model: nn.Module) -> Callable[[Params, Tensor, Tensor], Tensor]:
    """The ground-truth target: ``-cross_entropy`` per test example (larger is a better prediction)."""

    def target(params: Params, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            return -nn.functional.cross_entropy(functional_call(model, params, (x,)), y, reduction="none")

    return target


def flip_labels(y: Tensor, fraction: float, seed: int, classes: int = 10) -> tuple[Tensor, Tensor]:
    """``fraction`` of the labels replaced by a different class (seeded); the new labels and the flipped mask."""
    generator = torch.Generator().manual_seed(seed)
    n = len(y)
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.randperm(n, generator=generator)[: round(fraction * n)]] = True
    shift = torch.randint(1, classes, (n,), generator=generator)
    return torch.where(flipped, (y + shift) % classes, y), flipped


def make_setting(name: str, *, n_train: int = 1000, n_test: int = 100, seed: int = 0, noisy: bool = False,
                 ensemble: int = 1) -> Setting:
    """Fit the setting's model; ``ensemble`` independently initialised fits for TRAK (the first is the model's)."""
    if name not in _RECIPES:
        raise ValueError(f"setting: expected one of {SETTINGS}, got {name!r}")
    build, dtype, l2, iterations, final, warm = _RECIPES[name]
    split = load_digits_split(n_train, seed=seed, dtype=dtype)
    y_train, is_noisy = (flip_labels(split.y_train, 0.1, seed + 100) if noisy else (split.y_train, None))
    data = Data(split.x_train, y_train, split.x_test[:n_test], split.y_test[:n_test])
    model = build(seed, dtype)
    init = {k: v.detach().clone() for k, v in model.named_parameters()}

    def train_fn(x: Tensor, y: Tensor, start: Optional[Params] = None, max_iter: int = iterations) -> Params:
        return fit(model, x, y, l2=l2, init=init if start is None else start, max_iter=max_iter)

    params = train_fn(data.x_train, data.y_train)
    checkpoints = [train_fn(data.x_train, data.y_train, max_iter=k) for k in CHECKPOINT_ITERATIONS] + [params]
    others = []
    for member in range(1, ensemble):
        start = {k: v.detach().clone() for k, v in build(seed + 1000 * member, dtype).named_parameters()}
        others.append(train_fn(data.x_train, data.y_train, start=start))
    model.load_state_dict(params)
    key = f"{name}-n{n_train}-t{n_test}-seed{seed}-l2{l2}-it{iterations}{'-noisy' if noisy else ''}"
    retrain_start = params if warm else init
    return Setting(name, model, data, params, checkpoints, [params] + others,
                   lambda x, y: train_fn(x, y, start=retrain_start), l2, final, key, is_noisy)


def states(setting: Setting, params_list: List[Params]) -> List[Dict[str, Tensor]]:
    """Full state dicts (buffers included) for a list of parameter dicts, as checkpoints for a task."""
    buffers = dict(setting.model.named_buffers())
    return [{**{k: v.clone() for k, v in buffers.items()}, **{k: v.clone() for k, v in p.items()}}
            for p in params_list]
