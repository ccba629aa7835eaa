"""The benchmark settings: scikit-learn digits with logistic regression, an MLP and a small CNN.

A setting holds the data (1,000 training / 100 test images by default, seeded), the
model fitted on the full training set from a fixed initialisation, checkpoints along
that fit (for TracIn), independently initialised fits (for TRAK's ensembles), and the
training recipe the ground truth retrains with (the same initialisation and, for SGD,
the same batch-order seed, so retraining noise is small). Two regimes:

- ``logreg``, ``mlp``, ``cnn``: full-batch L-BFGS on the L2-regularised cross-entropy
  to a tight optimum; checkpoints at L-BFGS iterations 5, 10, 25, 50 and the end.
  Logistic regression is convex, so its retraining starts from the fitted model (the
  same optimum, sooner).
- ``logreg-sgd``, ``mlp-sgd``: mini-batch SGD without an L2 term for a few epochs,
  stopped well before convergence, as most published attribution benchmarks train;
  checkpoints after every epoch.
- ``mlp-sgd-reinit``: ``mlp-sgd`` whose ground truth retrains each subset from its own
  random initialisation and batch order (seeded by the subset's content), so the
  retrained models carry training noise, as in the LDS of Park et al. (2023); with a
  fixed initialisation the ground truth is that one run's.

The noisy variant flips 10% of the training labels (seeded) for noisy-label detection."""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .digits import cnn, cross_entropy, fit, fit_sgd, l2_objective, load_digits_split, mlp, softmax_regression
from .retrain import Data, Params, digest

class Recipe(NamedTuple):
    """How a setting's model is built and trained."""

    build: Callable[[int, torch.dtype], nn.Module]  # (seed, dtype) -> model
    dtype: torch.dtype
    l2: float
    final_layer: str  # the final Linear layer's name (RPS)
    optimizer: str  # "lbfgs": full batch to a tight optimum; "sgd": mini-batches of 32 for a few epochs
    steps: int  # L-BFGS iterations, or SGD epochs
    lr: float = 0.0  # SGD's learning rate
    warm: bool = False  # retraining starts from the fitted model: the convex case, the same optimum only sooner
    reinit: bool = False  # retraining draws its initialisation and batch order from the subset (training noise)

    def tag(self) -> str:
        """The optimiser part of the ground truth's cache key."""
        tag = f"it{self.steps}" if self.optimizer == "lbfgs" else f"sgd-e{self.steps}-lr{self.lr}-b32"
        return tag + ("-reinit" if self.reinit else "")


_RECIPES = {
    "logreg": Recipe(lambda seed, dtype: softmax_regression(seed=seed, dtype=dtype), torch.float64, 1e-3, "",
                     "lbfgs", 500, warm=True),
    "mlp": Recipe(lambda seed, dtype: mlp(128, seed=seed, dtype=dtype), torch.float32, 1e-3, "2", "lbfgs", 300),
    "cnn": Recipe(lambda seed, dtype: cnn(16, seed=seed, dtype=dtype), torch.float32, 1e-3, "head", "lbfgs", 300),
    # The same models stopped early, as most published attribution benchmarks train them: SGD without an L2
    # term, checkpoints after each epoch.
    "logreg-sgd": Recipe(lambda seed, dtype: softmax_regression(seed=seed, dtype=dtype), torch.float32, 0.0, "",
                         "sgd", 5, lr=0.1),
    "mlp-sgd": Recipe(lambda seed, dtype: mlp(128, seed=seed, dtype=dtype), torch.float32, 0.0, "2", "sgd", 10,
                      lr=0.1),
    "mlp-sgd-reinit": Recipe(lambda seed, dtype: mlp(128, seed=seed, dtype=dtype), torch.float32, 0.0, "2", "sgd",
                             10, lr=0.1, reinit=True),
}
SETTINGS = tuple(_RECIPES)
CONVEX = {name for name, recipe in _RECIPES.items() if recipe.warm}
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

    @property
    def loss(self) -> Callable[[Params, tuple], Tensor]:
        """The mean cross-entropy of a batch ``(x, y)`` under parameters ``params``: ``loss(params, batch)``."""
        return cross_entropy(self.model)

    @property
    def objective(self) -> Callable[[Params, tuple], Tensor]:
        """What the model was fitted on: :attr:`loss` plus the setting's L2 term."""
        return l2_objective(self.model, self.l2)

    @property
    def train_batch(self) -> tuple[Tensor, Tensor]:
        """The whole training set as one batch ``(x, y)``."""
        return self.data.x_train, self.data.y_train

    @property
    def test_batch(self) -> tuple[Tensor, Tensor]:
        """The test images as one batch ``(x, y)``."""
        return self.data.x_test, self.data.y_test


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
                 ensemble: int = 1, checkpoints: bool = True) -> Setting:
    """Fit the setting's model; ``ensemble`` independently initialised fits for TRAK (the first is the model's).

    ``checkpoints=False`` skips the extra L-BFGS fits of TracIn's earlier checkpoints
    (an L-BFGS setting's ``checkpoints`` are then the final fit alone; SGD's come from
    its one run anyway); the fitted model is the same."""
    if name not in _RECIPES:
        raise ValueError(f"setting: expected one of {SETTINGS}, got {name!r}")
    recipe = _RECIPES[name]
    split = load_digits_split(n_train, seed=seed, dtype=recipe.dtype)
    y_train, is_noisy = (flip_labels(split.y_train, 0.1, seed + 100) if noisy else (split.y_train, None))
    data = Data(split.x_train, y_train, split.x_test[:n_test], split.y_test[:n_test])
    model = recipe.build(seed, recipe.dtype)
    init = {k: v.detach().clone() for k, v in model.named_parameters()}

    def trajectory(x: Tensor, y: Tensor, start: Optional[Params] = None, final_only: bool = False,
                   order: int = 1) -> List[Params]:
        """The checkpoints of one fit, its final parameters last (only those with ``final_only``).

        ``order`` seeds SGD's batch order."""
        start = init if start is None else start
        if recipe.optimizer == "sgd":
            return fit_sgd(model, x, y, init=start, epochs=recipe.steps, lr=recipe.lr, l2=recipe.l2, seed=order)
        iterations = (recipe.steps,) if final_only else (*CHECKPOINT_ITERATIONS, recipe.steps)
        return [fit(model, x, y, l2=recipe.l2, init=start, max_iter=k) for k in iterations]

    def train_fn(x: Tensor, y: Tensor, start: Optional[Params] = None) -> Params:
        return trajectory(x, y, start, final_only=True)[-1]

    def retrain_fn(x: Tensor, y: Tensor) -> Params:
        """The ground truth's refit: from the fitted model (convex), a fresh draw per subset (reinit), or ``init``."""
        if recipe.warm:
            return train_fn(x, y, start=params)
        if recipe.reinit:
            draw = int(digest(x, y)[:8], 16)  # a function of the subset: deterministic, so the cache stays valid
            with torch.random.fork_rng(devices=[]):  # building seeds torch's global generator; leave it as it was
                fresh = {k: v.detach().clone() for k, v in recipe.build(draw, recipe.dtype).named_parameters()}
            return trajectory(x, y, fresh, final_only=True, order=draw)[-1]
        return train_fn(x, y)

    fits = trajectory(data.x_train, data.y_train, final_only=not checkpoints)
    params = fits[-1]
    others = []
    for member in range(1, ensemble):
        member_model = recipe.build(seed + 1000 * member, recipe.dtype)
        start = {k: v.detach().clone() for k, v in member_model.named_parameters()}
        others.append(train_fn(data.x_train, data.y_train, start=start))
    model.load_state_dict(params)
    model_name = name.split("-")[0]  # the recipe's tag tells the training apart
    key = f"{model_name}-n{n_train}-t{n_test}-seed{seed}-l2{recipe.l2}-{recipe.tag()}{'-noisy' if noisy else ''}"
    return Setting(name, model, data, params, fits, [params] + others, retrain_fn, recipe.l2,
                   recipe.final_layer, key, is_noisy)


def states(setting: Setting, params_list: List[Params]) -> List[Dict[str, Tensor]]:
    """Full state dicts (buffers included) for a list of parameter dicts, as checkpoints for a task."""
    buffers = dict(setting.model.named_buffers())
    return [{**{k: v.clone() for k, v in buffers.items()}, **{k: v.clone() for k, v in p.items()}}
            for p in params_list]
