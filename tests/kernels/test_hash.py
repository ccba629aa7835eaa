"""The torch evaluation of the hash against a plain-Python uint32 oracle written from the docstring."""

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels import projection_entries
from kernels.hash import K0, M1, M2, M3, gaussian_table, row_key, to_uint, word
from kernels.reference import dense_tile, sjlt_positions

MASK = 0xFFFFFFFF


def py_mix(x):
    x ^= x >> 16
    x = (x * M1) & MASK
    x ^= x >> 15
    x = (x * M2) & MASK
    return x ^ (x >> 16)


def py_word(seed, p, w):
    key = py_mix(py_mix(py_mix(seed ^ K0) ^ (p & MASK)) ^ (p >> 32))
    return py_mix(key ^ ((w * M3) & MASK))


def py_entry(seed, p, j, kind):
    if kind == "rademacher":
        return -1.0 if (py_word(seed, p, j >> 5) >> (j & 31)) & 1 else 1.0
    index = (py_word(seed, p, j >> 1) >> (16 * (j & 1))) & 0xFFFF
    return float(gaussian_table(torch.device("cpu"))[index])


seeds = st.integers(0, 2**32 - 1)
rows = st.integers(0, 2**40)


@given(seeds, st.lists(rows, min_size=1, max_size=8), st.lists(st.integers(0, 2**20), min_size=1, max_size=8))
def test_words_equal_the_uint32_oracle(seed, ps, ws):
    keys = row_key(seed, torch.tensor(ps)).unsqueeze(1)
    got = to_uint(word(keys, torch.tensor(ws).unsqueeze(0)))
    expected = torch.tensor([[py_word(seed, p, w) for w in ws] for p in ps])
    assert torch.equal(got, expected)


@given(seeds, rows, st.integers(1, 70), st.sampled_from(["rademacher", "gaussian"]))
def test_entries_equal_the_oracle_including_rows_beyond_2_to_the_32(seed, p, dim_out, kind):
    tile = dense_tile(seed, torch.tensor([p, p + 2**33]), dim_out, kind)
    for r, row in enumerate([p, p + 2**33]):
        assert tile[r].tolist() == [py_entry(seed, row, j, kind) for j in range(dim_out)]


@given(seeds, st.integers(0, 2**34), st.integers(2, 40), st.integers(1, 6))
def test_sjlt_positions_equal_the_oracle(seed, p, dim_out, nnz):
    nnz = min(nnz, dim_out)
    columns, signs = sjlt_positions(seed, torch.tensor([p]), dim_out, nnz)
    for b in range(nnz):
        h = py_word(seed, p, b)
        start, stop = b * dim_out // nnz, (b + 1) * dim_out // nnz
        assert int(columns[0, b]) == start + (h >> 1) % (stop - start)
        assert float(signs[0, b]) == (-1.0 if h & 1 else 1.0)


def test_entries_do_not_depend_on_how_rows_are_grouped():
    whole = projection_entries(300, 50, kind="gaussian", seed=9)
    parts = torch.cat([projection_entries(n, 50, kind="gaussian", seed=9, offset=o) for o, n in [(0, 7), (7, 200), (207, 93)]])
    assert torch.equal(whole, parts)


def test_gaussian_table_is_a_unit_variance_normal_quantile_table():
    table = gaussian_table(torch.device("cpu")).double()
    assert abs(float(table.mean())) < 1e-6 and abs(float(table.pow(2).mean()) - 1) < 1e-6
    assert torch.equal(table, -table.flip(0))  # symmetric
    assert 4.3 < float(table.max()) < 4.5
    # Quantiles: the fraction of entries below x is Φ(x).
    for x in (-2.0, -0.5, 0.0, 1.0, 1.96):
        assert abs(float((table < x).double().mean()) - 0.5 * (1 + math.erf(x / math.sqrt(2)))) < 1e-3
