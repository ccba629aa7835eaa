"""The one method registry: tuned values read from benchmarks/tuned.json, names the harnesses derive from it."""

import json

import pytest
import torch

from benchmarks import attributors, dattri_methods, kronfluence_methods
from benchmarks.methods import METHODS, TUNED, read_tuned
from benchmarks.settings import SETTINGS, make_setting


def test_shipped_values_are_tuned_json_over_the_defaults():
    tuned = json.loads(TUNED.read_text())["tuned"]
    for name, method in METHODS.items():
        for setting in SETTINGS:
            assert method.settings_for(setting) == {**method.defaults, **tuned.get(name, {}).get(setting, {})}
    assert METHODS["ekfac"].settings_for("logreg")["damping"] == "heuristic"
    assert METHODS["arnoldi"].settings_for("cnn") == {"regularization": 1e-4, "proj_dim": 400, "max_iter": 400}
    assert METHODS["tracin"].settings_for("mlp") == {}


def test_tuned_json_naming_an_unknown_method_or_setting_is_refused(tmp_path):
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"tuned": {"cg": {"mlp-sdg": {"regularization": 0.1}}}}))
    with pytest.raises(ValueError, match="mlp-sdg"):
        read_tuned(METHODS, path=path)
    path.write_text(json.dumps({"tuned": {"newton": {}}}))
    with pytest.raises(ValueError, match="newton"):
        read_tuned(METHODS, path=path)
    path.write_text(json.dumps({"tunned": {}}))
    with pytest.raises(ValueError, match="tuned"):
        read_tuned(METHODS, path=path)


def test_the_side_by_side_harnesses_take_their_names_from_the_registry():
    assert set(attributors.METHODS) == {"explicit", "cg", "lissa", "datainf", "arnoldi", "ekfac"}
    assert all(attributors.CLASSES[m] == METHODS[m].attributor for m in attributors.METHODS)
    assert set(dattri_methods.NAMES) == set(METHODS) - {"trak-5", "trak-10", "trak-50"}
    assert kronfluence_methods.NAMES == ("ekfac", "kfac") and set(kronfluence_methods.OURS.values()) == {"ekfac"}


def test_a_setting_without_checkpoints_fits_the_same_model():
    full = make_setting("logreg", n_train=100, n_test=10)
    bare = make_setting("logreg", n_train=100, n_test=10, checkpoints=False)
    assert len(bare.checkpoints) == 1 and bare.checkpoints[-1] is bare.params and bare.key == full.key
    for name, value in full.params.items():
        torch.testing.assert_close(bare.params[name], value, rtol=0, atol=0)
    assert bare.train_batch[0] is bare.data.x_train and bare.test_batch[1] is bare.data.y_test
    assert float(bare.objective(bare.params, bare.train_batch)) > float(bare.loss(bare.params, bare.train_batch))
