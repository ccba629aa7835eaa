"""What every attributor promises, swept over every class: one test per invariant, not one per class.

- scores do not depend on how the training and test loaders batch the data;
- ``self_attribute`` is the diagonal of ``attribute(train, train)``;
- ``topk`` is ``attribute`` sorted, for proponents and opponents alike;
- an ensemble of checkpoints combines as documented: the mean of the checkpoints'
  scores (TracIn: weighted by ``weight_list``; TRAK: the mean kernel product times the
  mean ``Q``), and RPS, which explains one model, refuses several.
"""

import warnings

import pytest
import torch
from torch.utils.data import DataLoader

from tests.attrib_torch.attributors_under_test import (
    ATTRIBUTORS_UNDER_TEST,
    call,
    checkpoint,
    data,
    learning_rates,
    make_model,
    probability,
)

NAMES = sorted(ATTRIBUTORS_UNDER_TEST)


def rebatched(loader, size):
    return DataLoader(loader.dataset, batch_size=size)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untrained model's solvers warn (indefinite, not converged)
        yield


@pytest.mark.parametrize("name", NAMES)
def test_scores_do_not_depend_on_batch_sizes(name):
    train, test = data()
    results = []
    for train_size, test_size in ((5, 4), (16, 1), (3, 8)):
        attributor = ATTRIBUTORS_UNDER_TEST[name](make_model())
        tr, te = rebatched(train, train_size), rebatched(test, test_size)
        attributor.cache(tr)
        results.append(call(attributor, "attribute", tr, te))
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_self_attribute_is_the_diagonal_and_topk_is_the_sorted_scores(name):
    train, test = data()
    attributor = ATTRIBUTORS_UNDER_TEST[name](make_model())
    attributor.cache(train)
    full = call(attributor, "attribute", train, train)
    torch.testing.assert_close(attributor.self_attribute(train), torch.diagonal(full), rtol=1e-6, atol=1e-8)
    scores = call(attributor, "attribute", train, test)
    for proponents in (True, False):
        top = attributor.topk(test, 3, proponents=proponents, train_dataloader=train)
        expected = torch.sort(scores.T, dim=1, descending=proponents).values[:, :3]
        torch.testing.assert_close(top.values.to(expected.dtype), expected, rtol=1e-6, atol=1e-8)
        picked = scores.T.gather(1, top.indices)
        torch.testing.assert_close(picked, expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_ensembles_combine_their_checkpoints_as_documented(name):
    train, test = data()
    model = make_model()
    states = [checkpoint(model, 0.9), checkpoint(model, 1.1)]
    build = ATTRIBUTORS_UNDER_TEST[name]
    if name == "rps":
        with pytest.raises(ValueError, match="one checkpoint"):
            build(make_model(), states)
        return
    ensemble = build(make_model(), states)
    ensemble.cache(train)
    scores = call(ensemble, "attribute", train, test)
    singles = []
    for state in states:
        single = build(make_model(), [state])
        single.cache(train)
        singles.append(call(single, "attribute", train, test).double())
    if name == "trak":  # each single score is Q_c ⊙ K_c: the ensemble is mean_c K_c times mean_c Q_c
        p = probability(model.eval())  # the attributors run the model in eval mode
        qs = []
        for state in states:  # parameters and buffers (BatchNorm's statistics) of the checkpoint
            qs.append(torch.cat([1 - p(state, batch).double() for batch in train]))
        kernels = [s / q[:, None] for s, q in zip(singles, qs)]
        expected = (sum(kernels) / 2) * (sum(qs) / 2)[:, None]
    else:
        if name in ("tracin", "grad-cos"):  # a single checkpoint's scores carry its own weight, learning_rates([c])
            singles = [s / learning_rates([state])[0] for s, state in zip(singles, states)]
            weights = learning_rates(states)
        else:
            weights = [0.5, 0.5]
        expected = sum(w * s for w, s in zip(weights, singles))
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-7)
