import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels import empty_topk, inner, merge_topk, topk_inner


def stable_topk(scores, k, largest):
    """Oracle: per column, rows sorted by score with ties to the smaller row index."""
    order = torch.sort(scores.T, dim=1, descending=largest, stable=True).indices[:, :k]
    return scores.T.gather(1, order), order


@given(st.integers(1, 60), st.integers(1, 8), st.integers(1, 6), st.integers(1, 20), st.booleans(), st.booleans(),
       st.integers(0, 1000))
def test_equals_full_topk_whatever_the_block_size(n, m, width, block, largest, normalize, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, width, generator=g, dtype=torch.float64)
    b = torch.randn(m, width, generator=g, dtype=torch.float64)
    k = 1 + seed % n
    result = topk_inner(a, b, k, largest=largest, normalize=normalize, block_rows=block)
    full = inner(a, b, normalize=normalize)
    values, indices = stable_topk(full, k, largest)
    torch.testing.assert_close(result.values, values)
    assert torch.equal(result.indices, indices)
    reference = torch.topk(full, k, dim=0, largest=largest)
    torch.testing.assert_close(result.values, reference.values.T)


@given(st.integers(1, 60), st.integers(1, 5), st.integers(1, 4), st.integers(1, 20), st.booleans(), st.integers(0, 1000))
def test_float32_integer_scores_with_many_ties(n, m, width, block, largest, seed):
    # Small integers: every blocking computes the same exact scores, and ties abound.
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-2, 3, (n, width), generator=g).float()
    b = torch.randint(-2, 3, (m, width), generator=g).float()
    k = 1 + seed % n
    result = topk_inner(a, b, k, largest=largest, block_rows=block)
    values, indices = stable_topk(a @ b.T, k, largest)
    assert torch.equal(result.indices, indices) and torch.equal(result.values, values)


@given(st.integers(1, 9), st.booleans())
def test_ties_go_to_the_smallest_index(block, largest):
    # Integer-valued scores with many ties.
    a = torch.tensor([[1.0], [2.0], [1.0], [2.0], [0.0], [2.0], [1.0], [0.0]])
    b = torch.tensor([[1.0], [-1.0]])
    result = topk_inner(a, b, 5, largest=largest, block_rows=block)
    _, expected = stable_topk(a @ b.T, 5, largest)
    assert torch.equal(result.indices, expected)
    if largest:
        assert result.indices[0].tolist() == [1, 3, 5, 0, 2]


def test_bad_input():
    a, b = torch.randn(5, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match="k: cannot exceed"):
        topk_inner(a, b, 6)
    with pytest.raises(ValueError, match="k: expected"):
        topk_inner(a, b, 0)
    with pytest.raises(ValueError, match="b: width"):
        topk_inner(a, torch.randn(2, 4), 2)
    with pytest.raises(ValueError, match="a: expected a matrix"):
        inner(torch.randn(3), b)
    bad = a.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="a: rows"):
        topk_inner(bad, b, 2)
    with pytest.raises(ValueError, match="b: contains NaN"):
        topk_inner(a, b * float("nan"), 2)


@given(st.integers(1, 40), st.integers(1, 5), st.lists(st.integers(1, 15), min_size=1, max_size=4), st.booleans(),
       st.integers(0, 1000))
def test_merge_topk_of_blocks_is_the_topk_of_their_union(n, m, cuts, largest, seed):
    """Scores computed elsewhere, in uneven blocks (shards), with ties: the merge is exact."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(-3, 4, (n, m), generator=g).double()  # many ties
    k = 1 + seed % n
    running = empty_topk(m, torch.float64, torch.device("cpu"))
    start = 0
    for cut in cuts * n:
        if start >= n:
            break
        stop = min(n, start + cut)
        running = merge_topk(running, scores[start:stop].T, start, k, largest=largest)
        start = stop
    values, indices = stable_topk(scores, k, largest)
    torch.testing.assert_close(running.values, values)
    assert torch.equal(running.indices, indices)
    with pytest.raises(ValueError, match="NaN or Inf"):
        merge_topk(running, torch.full((m, 2), float("nan"), dtype=torch.float64), n, k)
