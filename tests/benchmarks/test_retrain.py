import pytest
import torch

from attrib_core import lds
from benchmarks import retrain
from benchmarks.retrain import Data, half_subsets, retrain_lds, retrain_loo


def data():
    g = torch.Generator().manual_seed(0)
    return Data(torch.randn(10, 2, generator=g), torch.arange(10.0), torch.randn(3, 2, generator=g), torch.zeros(3))


def sum_model():
    """A 'model' whose parameters are the sum of its training labels: exact bookkeeping of who was in."""
    calls = []

    def train_fn(x, y):
        calls.append(y.clone())
        return {"total": y.sum()}

    def target_fn(params, x, y):
        return params["total"].expand(len(y)).double()

    return train_fn, target_fn, calls


def test_subsets_are_positions_and_results_are_cached(tmp_path):
    train_fn, target_fn, calls = sum_model()
    d = data()
    truth = retrain_lds(train_fn, target_fn, d, n_subsets=5, seed=3, key="sum", cache_dir=tmp_path)
    assert torch.equal(truth.subsets, half_subsets(10, 5, seed=3)) and bool((truth.subsets.sum(1) == 5).all())
    # Each refit saw exactly the labels at its subset's positions (labels are positions here).
    for s, seen in enumerate(calls):
        assert torch.equal(seen, d.y_train[truth.subsets[s]])
    expected = truth.subsets.double() @ d.y_train.double()
    torch.testing.assert_close(truth.values, expected[:, None].expand(5, 3))
    # The labels are an exact linear datamodel: LDS 1 for scores = the label values.
    assert lds(d.y_train[:, None].double().expand(10, 3), truth.values, truth.subsets).mean == pytest.approx(1.0)
    calls.clear()
    again = retrain_lds(train_fn, target_fn, d, n_subsets=5, seed=3, key="sum", cache_dir=tmp_path)
    assert not calls and torch.equal(again.values, truth.values)
    more = retrain_lds(train_fn, target_fn, d, n_subsets=7, seed=3, key="sum", cache_dir=tmp_path)
    assert len(calls) == 2 and torch.equal(more.values[:5], truth.values)  # resumed, not redone


def test_leave_one_out_values_are_full_minus_without(tmp_path):
    train_fn, target_fn, _ = sum_model()
    truth = retrain_loo(train_fn, target_fn, data(), indices=[2, 7], key="sum", cache_dir=tmp_path)
    torch.testing.assert_close(truth.values, torch.tensor([[2.0] * 3, [7.0] * 3], dtype=torch.float64))


def test_cache_key_changes_with_the_data(tmp_path):
    train_fn, target_fn, calls = sum_model()
    d = data()
    retrain_lds(train_fn, target_fn, d, n_subsets=2, key="sum", cache_dir=tmp_path)
    retrain_lds(train_fn, target_fn, d._replace(y_train=d.y_train + 1), n_subsets=2, key="sum", cache_dir=tmp_path)
    assert len(calls) == 4 and len(list(tmp_path.iterdir())) == 2
    assert retrain.digest(d.x_train) != retrain.digest(d.x_train + 1)
