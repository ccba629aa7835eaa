"""kronfluence's K-FAC / EK-FAC adapter against our own factors (skipped where kronfluence is not installed)."""

import pytest
import torch

pytest.importorskip("kronfluence")

from attrib_core import ekfac, per_sample_grad  # noqa: E402
from attrib_core.metrics import spearman_columns  # noqa: E402
from benchmarks import kronfluence_methods  # noqa: E402
from benchmarks.digits import cross_entropy  # noqa: E402
from benchmarks.methods import attribute, loaders  # noqa: E402
from benchmarks.settings import make_setting  # noqa: E402


@pytest.fixture(scope="module")
def setting():
    return make_setting("logreg", n_train=60, n_test=5)


@pytest.mark.parametrize("name", kronfluence_methods.NAMES)
def test_empirical_fisher_scores_equal_ours(setting, name):
    # With the batches' own labels both fit the same factors, so the scores agree to float64 rounding.
    d = setting.data
    f = cross_entropy(setting.model)
    fit = ekfac(setting.model, f, setting.params, loaders(setting)[0], correct=name == "ekfac")
    g_train = per_sample_grad(f)(setting.params, (d.x_train, d.y_train))
    g_test = per_sample_grad(f)(setting.params, (d.x_test, d.y_test))
    ours = g_train @ fit.solve(g_test, damping=1e-3).T
    theirs = kronfluence_methods.attribute(setting, name, {"damping": 1e-3, "fisher": "empirical"})
    assert theirs.shape == (60, 5) and theirs.dtype == torch.float64
    torch.testing.assert_close(theirs, ours, rtol=1e-7, atol=1e-9)


def test_default_scores_have_our_sign(setting):
    # Sampled labels and the heuristic damping: not our numbers, but positive must still mean "helps".
    explicit = attribute(setting, "explicit", {"regularization": 1e-3})
    theirs = kronfluence_methods.attribute(setting, "ekfac", {})
    assert bool(torch.isfinite(theirs).all())
    assert float(spearman_columns(theirs, explicit).mean()) > 0.25
