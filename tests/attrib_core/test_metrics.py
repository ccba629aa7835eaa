"""Metrics against scipy and scikit-learn on hypothesis-drawn inputs."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from attrib_core import brittleness, lds, loo_correlation, mislabel_auc
from attrib_core.metrics import rank, spearman_columns


def drawn(seed, shape, ties):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return torch.round(x * 2) if ties else x  # rounding makes many ties


@given(st.integers(1, 12), st.integers(1, 4), st.booleans(), st.integers(0, 10**6))
def test_rank_is_scipy_rankdata(n, m, ties, seed):
    x = drawn(seed, (n, m), ties)
    expected = np.stack([stats.rankdata(x[:, j].numpy()) for j in range(m)], axis=1)
    np.testing.assert_allclose(rank(x, 0).numpy(), expected)


@given(st.integers(3, 15), st.integers(1, 5), st.booleans(), st.integers(0, 10**6))
def test_spearman_columns_is_scipy(n, m, ties, seed):
    a, b = drawn(seed, (n, m), ties), drawn(seed + 1, (n, m), ties)
    ours = spearman_columns(a, b)
    for j in range(m):
        expected = stats.spearmanr(a[:, j].numpy(), b[:, j].numpy()).statistic
        if math.isnan(expected):
            assert math.isnan(float(ours[j]))
        else:
            assert float(ours[j]) == pytest.approx(expected, abs=1e-12)


@given(st.integers(3, 12), st.integers(2, 10), st.integers(1, 4), st.integers(0, 10**6))
def test_lds_is_the_spearman_of_subset_sums(n_train, n_subsets, n_test, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_train, n_test, generator=g, dtype=torch.float64)
    subsets = torch.rand(n_subsets, n_train, generator=g) < 0.5
    gt = torch.randn(n_subsets, n_test, generator=g, dtype=torch.float64)
    result = lds(scores, gt, subsets)
    values = []
    for j in range(n_test):  # the plain loop over test examples, with scipy
        predicted = [float(scores[subsets[s], j].sum()) for s in range(n_subsets)]
        values.append(stats.spearmanr(predicted, gt[:, j].numpy()).statistic)
    np.testing.assert_allclose(result.per_test.numpy(), np.array(values), atol=1e-12)
    defined = [v for v in values if not math.isnan(v)]
    if defined:
        assert result.mean == pytest.approx(float(np.mean(defined)), abs=1e-12)


@given(st.integers(4, 12), st.integers(2, 8), st.integers(0, 10**6))
def test_lds_takes_dattris_index_form(n_train, n_subsets, seed):
    """Subsets as training indices (dattri's (n_subsets, subset_size) tensor, or ragged lists) equal their masks."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_train, 3, generator=g, dtype=torch.float64)
    gt = torch.randn(n_subsets, 3, generator=g, dtype=torch.float64)
    size = n_train // 2
    index = torch.stack([torch.randperm(n_train, generator=g)[:size] for _ in range(n_subsets)])
    masks = torch.zeros(n_subsets, n_train, dtype=torch.bool).scatter_(1, index, True)
    expected = lds(scores, gt, masks).per_test
    np.testing.assert_array_equal(lds(scores, gt, index).per_test.numpy(), expected.numpy())
    np.testing.assert_array_equal(lds(scores, (gt, index)).per_test.numpy(), expected.numpy())
    ragged = [row[: size - (i % 2)].tolist() for i, row in enumerate(index)]
    ragged_masks = torch.zeros(n_subsets, n_train, dtype=torch.bool)
    for i, row in enumerate(ragged):
        ragged_masks[i, row] = True
    np.testing.assert_array_equal(lds(scores, gt, ragged).per_test.numpy(),
                                  lds(scores, gt, ragged_masks).per_test.numpy())


def test_lds_of_a_perfect_linear_datamodel_is_one():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(20, 3, generator=g, dtype=torch.float64)
    subsets = torch.rand(30, 20, generator=g) < 0.5
    gt = subsets.double() @ scores * 2 + 1  # monotone in the prediction
    assert lds(scores, gt, subsets).mean == pytest.approx(1.0)
    assert lds(-scores, gt, subsets).mean == pytest.approx(-1.0)


@given(st.integers(3, 15), st.integers(1, 4), st.integers(0, 10**6))
def test_loo_correlation_is_scipy(n, m, seed):
    a, b = drawn(seed, (n, m), False), drawn(seed + 7, (n, m), False)
    result = loo_correlation(a, b)
    for j in range(m):
        assert float(result.pearson[j]) == pytest.approx(stats.pearsonr(a[:, j], b[:, j]).statistic, abs=1e-12)
        assert float(result.spearman[j]) == pytest.approx(stats.spearmanr(a[:, j], b[:, j]).statistic, abs=1e-12)


@given(st.integers(2, 30), st.booleans(), st.integers(0, 10**6))
def test_mislabel_auc_and_roc_are_sklearn(n, ties, seed):
    g = torch.Generator().manual_seed(seed)
    scores = drawn(seed, (n,), ties)
    noisy = torch.rand(n, generator=g) < 0.3
    noisy[0], noisy[1] = True, False  # both classes
    result = mislabel_auc(scores, noisy)
    assert result.auc == pytest.approx(roc_auc_score(noisy.numpy(), scores.numpy()), abs=1e-12)
    fpr, tpr, thresholds = roc_curve(noisy.numpy(), scores.numpy(), drop_intermediate=False)
    np.testing.assert_allclose(result.fpr.numpy(), fpr)
    np.testing.assert_allclose(result.tpr.numpy(), tpr)
    np.testing.assert_allclose(result.thresholds.numpy()[1:], thresholds[1:])


def test_brittleness_finds_the_smallest_flipping_removal():
    """A retraining oracle with a known answer: test j flips once 3 of its 'supporters' are gone."""
    n_train, n_test = 12, 3
    supporters = {0: [4, 7, 9], 1: [0, 1, 2, 3, 5], 2: [11]}
    scores = torch.zeros(n_train, n_test, dtype=torch.float64)
    for j, idx in supporters.items():
        scores[idx, j] = torch.arange(len(idx), 0, -1, dtype=torch.float64)  # supporters ranked first
    calls = []

    def still_correct(keep, j):
        calls.append(j)
        return int((~keep[supporters[j]]).sum()) < 3

    result = brittleness(scores, still_correct, counts=[1, 2, 3, 4, 5])
    assert result.removed.tolist() == [3, 3, -1]
    assert result.flipped.tolist() == [True, True, False]
    assert calls.count(0) == 3 and calls.count(2) == 5  # stops at the first flip
    with pytest.raises(ValueError, match="counts"):
        brittleness(scores, still_correct, counts=[0, 2])


def test_bad_input():
    scores = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="subsets"):
        lds(scores, torch.zeros(3, 2), torch.zeros(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="gt_values"):
        lds(scores, torch.zeros(3, 1), torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"subsets: indices must lie in \[0, 4\)"):
        lds(scores, torch.zeros(2, 2), torch.tensor([[0, 5], [1, 2]]))
    with pytest.raises(ValueError, match="dattri's pair"):
        lds(scores, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="scores"):
        lds(torch.full((4, 2), float("nan")), torch.zeros(3, 2), torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_noisy"):
        mislabel_auc(torch.zeros(4), torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="loo_values"):
        loo_correlation(scores, torch.zeros(3, 2))
