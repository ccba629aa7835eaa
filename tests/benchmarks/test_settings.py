import pytest
import torch

from benchmarks.digits import accuracy
from benchmarks.settings import CONVEX, SETTINGS, make_setting


def test_sgd_settings_keep_a_checkpoint_per_epoch_and_retrain_deterministically():
    setting = make_setting("logreg-sgd", n_train=200, n_test=20)
    assert len(setting.checkpoints) == 5 and setting.checkpoints[-1] is setting.params
    assert "logreg-sgd" not in CONVEX and setting.key.endswith("sgd-e5-lr0.1-b32")
    first = setting.checkpoints[0]["weight"]
    assert not torch.equal(first, setting.params["weight"])  # epochs move the model
    d = setting.data
    again = setting.train_fn(d.x_train, d.y_train)
    for name, value in setting.params.items():  # the same data: the same run, batch order included
        torch.testing.assert_close(again[name], value, rtol=0, atol=0)
    half = setting.train_fn(d.x_train[:100], d.y_train[:100])
    assert not torch.equal(half["weight"], setting.params["weight"])
    assert accuracy(setting.model, setting.params, d.x_train, d.y_train) > 0.5  # stopped early, well above 0.1


def test_lbfgs_checkpoints_end_at_the_fitted_model_and_keys_name_the_optimiser():
    setting = make_setting("logreg", n_train=100, n_test=10)
    assert len(setting.checkpoints) == 5 and setting.checkpoints[-1] is setting.params
    assert setting.key == "logreg-n100-t10-seed0-l20.001-it500"  # the cache key of earlier runs, unchanged
    assert set(SETTINGS) >= {"logreg", "mlp", "cnn", "logreg-sgd", "mlp-sgd"}
    with pytest.raises(ValueError, match="setting"):
        make_setting("resnet")


def test_reinit_ground_truth_draws_its_initialisation_from_the_subset():
    fixed = make_setting("mlp-sgd", n_train=120, n_test=10)
    noisy = make_setting("mlp-sgd-reinit", n_train=120, n_test=10)
    assert noisy.key == fixed.key + "-reinit" and "mlp-sgd-reinit" not in CONVEX
    for name, value in fixed.params.items():  # the model attributed is the same; only the ground truth differs
        torch.testing.assert_close(noisy.params[name], value, rtol=0, atol=0)
    d = noisy.data
    state = torch.random.get_rng_state()
    first = noisy.train_fn(d.x_train[:60], d.y_train[:60])
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left alone
    again = noisy.train_fn(d.x_train[:60], d.y_train[:60])
    other = noisy.train_fn(d.x_train[60:], d.y_train[60:])
    same_init = fixed.train_fn(d.x_train[:60], d.y_train[:60])
    assert torch.equal(first["0.weight"], again["0.weight"])  # deterministic: the cached truth stays valid
    assert not torch.equal(first["0.weight"], same_init["0.weight"])  # not the fixed initialisation's run
    # Each subset starts elsewhere: far more apart than the data alone would move a fixed start.
    spread = (first["0.weight"] - other["0.weight"]).norm()
    assert spread > 2 * (same_init["0.weight"] - fixed.train_fn(d.x_train[60:], d.y_train[60:])["0.weight"]).norm()
