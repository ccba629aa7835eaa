"""How well attribution scores predict retraining: LDS, leave-one-out correlation, mislabel AUC, brittleness.

Sign convention, for every attributor and every metric here: a positive score
``scores[i, j]`` means training example ``i`` helps test example ``j``'s prediction.
Ground-truth values are oriented the same way: larger means a better prediction
(the correct-class margin, or minus the test loss), so a good attribution
correlates *positively* with them.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "LDSResult",
    "LOOResult",
    "MislabelResult",
    "BrittlenessResult",
    "lds",
    "loo_correlation",
    "mislabel_auc",
    "brittleness",
    "rank",
    "pearson_columns",
    "spearman_columns",
]


class LDSResult(NamedTuple):
    """``per_test`` ``(n_test,)`` Spearman correlations (NaN where undefined) and ``mean`` over the defined ones."""

    per_test: Tensor
    mean: float


class LOOResult(NamedTuple):
    """Per-test ``pearson`` and ``spearman`` ``(n_test,)`` correlations with leave-one-out effects, and their means."""

    pearson: Tensor
    spearman: Tensor
    pearson_mean: float
    spearman_mean: float


class MislabelResult(NamedTuple):
    """``auc`` and the ROC curve: ``fpr``, ``tpr`` at each distinct ``threshold`` (descending), from (0, 0)."""

    auc: float
    fpr: Tensor
    tpr: Tensor
    thresholds: Tensor


class BrittlenessResult(NamedTuple):
    """``removed`` ``(n_test,)``: the smallest tried count whose removal flipped each prediction, -1 if none did."""

    removed: Tensor
    flipped: Tensor


def rank(values: Tensor, dim: int = 0) -> Tensor:
    """Ranks ``1 .. n`` along ``dim``, ties given their average rank (as ``scipy.stats.rankdata``), float64."""
    x = values.double().movedim(dim, -1)
    order = x.argsort(dim=-1, stable=True)
    sorted_x = x.gather(-1, order)
    n = x.shape[-1]
    positions = torch.arange(1, n + 1, dtype=torch.float64, device=x.device).expand_as(x)
    # Each run of equal values gets the mean of its positions: cumulative sums at the run ends.
    new_run = torch.ones_like(sorted_x, dtype=torch.bool)
    new_run[..., 1:] = sorted_x[..., 1:] != sorted_x[..., :-1]
    run_id = new_run.long().cumsum(-1) - 1
    totals = torch.zeros_like(sorted_x).scatter_add_(-1, run_id, positions)
    counts = torch.zeros_like(sorted_x).scatter_add_(-1, run_id, torch.ones_like(positions))
    ranked_sorted = (totals / counts.clamp(min=1)).gather(-1, run_id)
    ranks = torch.empty_like(ranked_sorted).scatter_(-1, order, ranked_sorted)
    return ranks.movedim(-1, dim)


def pearson_columns(a: Tensor, b: Tensor) -> Tensor:
    """``(m,)``: the Pearson correlation of each column of ``a`` ``(n, m)`` with that of ``b``; NaN for a constant column."""
    a, b = a.double(), b.double()
    a = a - a.mean(0)
    b = b - b.mean(0)
    denominator = a.norm(dim=0) * b.norm(dim=0)
    out = (a * b).sum(0) / denominator
    return torch.where(denominator > 0, out, torch.full_like(out, float("nan")))


def spearman_columns(a: Tensor, b: Tensor) -> Tensor:
    """``(m,)``: the Spearman correlation of each column pair (Pearson of average ranks), vectorised."""
    return pearson_columns(rank(a, 0), rank(b, 0))


def _nanmean(x: Tensor) -> float:
    defined = x[~torch.isnan(x)]
    return float(defined.mean()) if defined.numel() else float("nan")


def _check_scores(scores: Tensor) -> None:
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        raise ValueError(f"scores: expected a (n_train, n_test) tensor, got {getattr(scores, 'shape', type(scores))}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores: contains NaN or Inf")


def lds(scores: Tensor, gt_values: Any, subsets: Any = None) -> LDSResult:
    """Linear datamodeling score (Park et al., ICML 2023).

    For each subset ``S_s`` of the training set and test example ``j``, the
    attribution predicts ``Σ_{i ∈ S_s} scores[i, j]``; LDS is the Spearman correlation,
    over subsets, between these predictions and the values ``gt_values[s, j]`` measured
    on models retrained on ``S_s``.

    Args:
        scores: ``(n_train, n_test)``.
        gt_values: ``(n_subsets, n_test)``, larger meaning a better prediction; or
            dattri's ground truth, the pair ``(gt_values, subsets)`` (then ``subsets``
            is not given).
        subsets: ``(n_subsets, n_train)`` boolean membership (or 0/1) masks, or the
            training indices of each subset: an integer ``(n_subsets, subset_size)``
            tensor (dattri's form) or a list of index lists.

    Returns:
        :class:`LDSResult`; a test example whose values or predictions are constant
        over subsets has NaN and is left out of the mean.
    """
    _check_scores(scores)
    if subsets is None:
        if not (isinstance(gt_values, (tuple, list)) and len(gt_values) == 2):
            raise ValueError("subsets: not given, so gt_values must be dattri's pair (gt_values, subsets)")
        gt_values, subsets = gt_values
    masks = _subset_masks(subsets, scores.shape[0])
    if gt_values.shape != (masks.shape[0], scores.shape[1]):
        raise ValueError(f"gt_values: expected ({masks.shape[0]}, {scores.shape[1]}), got {tuple(gt_values.shape)}")
    if masks.shape[0] < 2:
        raise ValueError("subsets: need at least two subsets for a correlation")
    predicted = masks.to(torch.float64) @ scores.double()
    per_test = spearman_columns(predicted, gt_values)
    return LDSResult(per_test, _nanmean(per_test))


def _subset_masks(subsets: Any, n_train: int) -> Tensor:
    """``(n_subsets, n_train)`` 0/1 masks from masks, an integer index tensor or a list of index lists."""
    if isinstance(subsets, (list, tuple)):
        rows = [torch.as_tensor(list(s), dtype=torch.long) for s in subsets]
        masks = torch.zeros(len(rows), n_train, dtype=torch.bool)
        for i, row in enumerate(rows):
            _check_indices(row, n_train)
            masks[i, row] = True
        return masks
    if not isinstance(subsets, Tensor) or subsets.dim() != 2:
        raise ValueError(f"subsets: expected (n_subsets, {n_train}) masks or (n_subsets, subset_size) indices, "
                         f"got {type(subsets).__name__} {tuple(getattr(subsets, 'shape', ()))}")
    is_mask = subsets.dtype == torch.bool or subsets.is_floating_point() or (
        subsets.shape[1] == n_train and bool(((subsets == 0) | (subsets == 1)).all()))
    if is_mask:
        if subsets.shape[1] != n_train:
            raise ValueError(f"subsets: expected (n_subsets, {n_train}) masks, got {tuple(subsets.shape)}")
        return subsets
    masks = torch.zeros(subsets.shape[0], n_train, dtype=torch.bool, device=subsets.device)
    _check_indices(subsets, n_train)
    return masks.scatter_(1, subsets.long(), True)


def _check_indices(index: Tensor, n_train: int) -> None:
    if index.numel() and not (0 <= int(index.min()) and int(index.max()) < n_train):
        raise ValueError(f"subsets: indices must lie in [0, {n_train}), got {int(index.min())}..{int(index.max())}")


def loo_correlation(scores: Tensor, loo_values: Tensor) -> LOOResult:
    """Correlation of scores with leave-one-out effects, per test example.

    Args:
        scores: ``(n, n_test)`` for the ``n`` training examples that were left out.
        loo_values: ``(n, n_test)``: ``f(full model) - f(model without example i)`` for
            each test value ``f`` (positive when ``i`` helped), the same orientation as scores.
    """
    _check_scores(scores)
    if loo_values.shape != scores.shape:
        raise ValueError(f"loo_values: expected shape {tuple(scores.shape)} like scores, got {tuple(loo_values.shape)}")
    pearson = pearson_columns(scores, loo_values)
    spearman = spearman_columns(scores, loo_values)
    return LOOResult(pearson, spearman, _nanmean(pearson), _nanmean(spearman))


def mislabel_auc(self_scores: Tensor, is_noisy: Tensor) -> MislabelResult:
    """Noisy-label detection: the ROC of ranking training examples by self-influence, flagged highest first.

    ``auc`` equals ``sklearn.metrics.roc_auc_score(is_noisy, self_scores)`` (ties count
    one half); the curve has one point per distinct score.

    Args:
        self_scores: ``(n,)``.
        is_noisy: ``(n,)`` booleans; both classes must occur.
    """
    if self_scores.dim() != 1 or is_noisy.shape != self_scores.shape:
        raise ValueError(f"is_noisy: expected shape {tuple(self_scores.shape)} like self_scores (1-D), "
                         f"got {tuple(is_noisy.shape)}")
    if not bool(torch.isfinite(self_scores).all()):
        raise ValueError("self_scores: contains NaN or Inf")
    noisy = is_noisy.bool()
    n_pos, n_neg = int(noisy.sum()), int((~noisy).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("is_noisy: needs both noisy and clean examples")
    ranks = rank(self_scores)
    auc = (float(ranks[noisy].sum()) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    thresholds, inverse = torch.unique(self_scores.double(), sorted=True, return_inverse=True)
    thresholds = thresholds.flip(0)
    group = len(thresholds) - 1 - inverse  # 0 for the highest score
    positives = torch.zeros(len(thresholds), dtype=torch.float64).index_add_(0, group, noisy.double())
    negatives = torch.zeros(len(thresholds), dtype=torch.float64).index_add_(0, group, (~noisy).double())
    zero = torch.zeros(1, dtype=torch.float64)
    tpr = torch.cat([zero, positives.cumsum(0) / n_pos])
    fpr = torch.cat([zero, negatives.cumsum(0) / n_neg])
    return MislabelResult(auc, fpr, tpr, torch.cat([torch.tensor([float("inf")], dtype=torch.float64), thresholds]))


def brittleness(scores: Tensor, still_correct: Callable[[Tensor, int], bool], *,
                counts: Sequence[int], test_indices: Optional[Sequence[int]] = None) -> BrittlenessResult:
    """Data brittleness (Ilyas et al., 2022): the fewest top-scored training examples whose removal flips a prediction.

    For each test example ``j``, training examples are removed in order of decreasing
    ``scores[:, j]`` (its strongest proponents first); for each ``k`` of ``counts`` in
    increasing order, ``still_correct(keep, j)`` retrains without the removed ones
    (``keep`` an ``(n_train,)`` boolean mask) and says whether test example ``j`` is
    still predicted correctly. The first ``k`` for which it is not is recorded.

    Args:
        scores: ``(n_train, n_test)``.
        still_correct: the retraining oracle, ``(keep, j) -> bool``.
        counts: removal sizes to try, each in ``[1, n_train]``.
        test_indices: the test examples to evaluate (default: all).

    Returns:
        :class:`BrittlenessResult`: ``removed`` ``(n,)`` the smallest flipping count or -1,
        ``flipped`` ``(n,)`` booleans, for the evaluated test examples in order.
    """
    _check_scores(scores)
    n_train = scores.shape[0]
    sizes = sorted(set(int(k) for k in counts))
    if not sizes or sizes[0] < 1 or sizes[-1] > n_train:
        raise ValueError(f"counts: expected removal sizes in [1, {n_train}], got {list(counts)}")
    indices = list(range(scores.shape[1])) if test_indices is None else [int(j) for j in test_indices]
    removed = torch.full((len(indices),), -1, dtype=torch.long)
    for position, j in enumerate(indices):
        order = torch.argsort(scores[:, j], descending=True, stable=True)
        for k in sizes:
            keep = torch.ones(n_train, dtype=torch.bool)
            keep[order[:k]] = False
            if not still_correct(keep, j):
                removed[position] = k
                break
    return BrittlenessResult(removed, removed >= 0)
