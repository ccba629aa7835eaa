"""What every attributor promises, swept over every class: one test per invariant, not one per class.

- scores do not depend on how the training and test loaders batch the data;
- ``self_attribute`` is the diagonal of ``attribute(train, train)``;
- ``topk`` is ``attribute`` sorted, for proponents and opponents alike.
"""

import warnings

import pytest
import torch
from torch.utils.data import DataLoader

from tests.attrib_torch.attributors_under_test import ATTRIBUTORS_UNDER_TEST, call, data, make_model

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
