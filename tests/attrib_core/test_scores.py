import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attrib_core import cosine, inner_products, self_scores, topk_scores


@given(st.integers(1, 30), st.integers(1, 10), st.integers(1, 8), st.integers(0, 1000))
def test_scores_against_plain_torch(n, m, k, seed):
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(n, k, generator=g, dtype=torch.float64)
    test = torch.randn(m, k, generator=g, dtype=torch.float64)
    torch.testing.assert_close(inner_products(train, test), train @ test.T)
    expected_cos = (train / train.norm(dim=1, keepdim=True)) @ (test / test.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(cosine(train, test), expected_cos)
    top = topk_scores(train, test, min(3, n))
    torch.testing.assert_close(top.values, torch.topk(train @ test.T, min(3, n), dim=0).values.T)
    bottom = topk_scores(train, test, 1, largest=False)
    assert torch.equal(bottom.indices[:, 0], (train @ test.T).argmin(0))
    torch.testing.assert_close(self_scores(train), (train * train).sum(1))
    transformed = 2 * train
    torch.testing.assert_close(self_scores(train, transformed), torch.diagonal(train @ transformed.T))


def test_self_scores_shape_check():
    with pytest.raises(ValueError, match="transformed"):
        self_scores(torch.ones(3, 2), torch.ones(3, 3))


def test_cosine_of_tiny_rows():
    g = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 1e-20
    torch.testing.assert_close(torch.diagonal(cosine(g, g)), torch.ones(3), rtol=1e-5, atol=1e-5)
