"""The mini-batch spectrum script against an explicit Hessian, and its LiSSA bound against the solver."""

import pytest
import torch

from attrib_core import Status, hessian, lissa, make_hvp
from benchmarks.digits import cross_entropy
from benchmarks.minibatch_spectrum import smallest_scaling, spectrum
from benchmarks.settings import make_setting


@pytest.fixture(scope="module")
def setting():
    return make_setting("logreg", n_train=30, n_test=5)


@pytest.fixture(scope="module")
def found(setting):
    # 30 images span a Hessian of rank <= 270 < 300 steps: the Krylov space is exhausted, so the extremes are exact.
    return spectrum(setting, batches=1, batch_size=30, steps=300)


def test_extremes_equal_the_explicit_hessians_eigenvalues(setting, found):
    d = setting.data
    evals = torch.linalg.eigvalsh(hessian(cross_entropy(setting.model), setting.params, (d.x_train, d.y_train)))
    full = found[0]
    assert (full.batch, full.size) == ("full", 30)
    torch.testing.assert_close(full.largest, float(evals.max()), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(full.smallest, float(evals.min()), rtol=0, atol=1e-8)
    for batch in found[1:]:  # a "mini-batch" of every image, in another order: the same Hessian
        assert batch.size == 30
        torch.testing.assert_close(batch.largest, full.largest, rtol=1e-8, atol=0)


def test_lissa_contracts_just_above_the_printed_scaling_and_diverges_just_below(setting, found):
    d = setting.data
    f = cross_entropy(setting.model)
    damping = 0.01
    bound = smallest_scaling(found, damping)

    full = make_hvp(f, setting.params, (d.x_train, d.y_train))  # every step's "mini-batch" is the whole set

    def sample_mv(generator):
        return full

    v = torch.randn(650, dtype=torch.float64)
    # dattri's damping d is a shift of d * scaling in the core's terms
    above = lissa(sample_mv, v, max_steps=200, scale=1.05 * bound, damping=damping * 1.05 * bound)
    below = lissa(sample_mv, v, max_steps=200, scale=0.9 * bound, damping=damping * 0.9 * bound)
    assert int(above.status) != Status.DIVERGED and int(below.status) == Status.DIVERGED


def test_bad_arguments_are_named(setting, found):
    with pytest.raises(ValueError, match="batch_size"):
        spectrum(setting, batches=1, batch_size=61, steps=5)
    with pytest.raises(ValueError, match="damping"):
        smallest_scaling(found, damping=2.0)
