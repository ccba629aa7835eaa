"""The dattri side-by-side harness: every counterpart runs on our inputs (skipped without dattri)."""

import pytest
import torch

pytest.importorskip("dattri")

from benchmarks import dattri_methods  # noqa: E402 - after the skip
from benchmarks.methods import METHODS, attribute  # noqa: E402
from benchmarks.settings import make_setting  # noqa: E402

CHEAP = {"lissa": {"damping": 1e-2, "scaling": 5.0, "recursion_depth": 20},
         "arnoldi": {"regularization": 1e-1, "proj_dim": 40}}


@pytest.fixture(scope="module")
def logreg():
    return make_setting("logreg", n_train=200, n_test=10)  # float64 and a bare nn.Linear: dattri's two stumbling blocks


@pytest.mark.parametrize("name", dattri_methods.NAMES)
def test_every_dattri_counterpart_runs_and_gives_finite_scores(logreg, name):
    hyper = CHEAP.get(name, METHODS[name].settings_for("logreg"))
    scores = dattri_methods.attribute(logreg, name, hyper)
    assert scores.shape == (200, 10) and bool(torch.isfinite(scores).all())
    assert torch.get_default_dtype() == torch.float32  # the harness restores torch's default dtype


def test_explicit_agrees_with_ours_on_one_batch(logreg):
    # 200 examples are one batch of the loaders, so dattri's sum of per-batch inverses is the full inverse.
    hyper = METHODS["explicit"].settings_for("logreg")
    theirs = dattri_methods.attribute(logreg, "explicit", hyper).double()
    ours = attribute(logreg, "explicit", hyper).double()
    torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=1e-8 * float(ours.abs().max()))
