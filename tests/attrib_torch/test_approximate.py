"""Approximate top-k through FAISS: exact when every list is scanned (ivf-flat), close with 8-bit rows, saved and
reopened beside the store, refused for a rebuilt store."""

import pytest
import torch

pytest.importorskip("faiss")

from attrib_torch.approximate import ApproximateIndex, recall_at_k  # noqa: E402
from attrib_torch.store import StoreMismatch, StoreWriter  # noqa: E402

ROWS, WIDTH = 3000, 16


def clustered_store(path, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(40, WIDTH, generator=g) * 3
    rows = centers[torch.randint(0, 40, (ROWS,), generator=g)] + torch.randn(ROWS, WIDTH, generator=g)
    writer = StoreWriter(path, width=WIDTH, description={"synthetic": seed})
    for block in rows.split(700):
        writer.append(block)
    return writer.close({}), rows


@pytest.mark.parametrize("largest", [True, False])
def test_scanning_every_list_of_a_flat_index_is_the_exact_top_k(tmp_path, largest):
    store, rows = clustered_store(tmp_path / "s")
    index = ApproximateIndex.build(store, nlist=20, block_rows=512, show_progress=False)
    queries = torch.randn(7, WIDTH, generator=torch.Generator().manual_seed(1))
    exact = store.topk(queries, 10, largest=largest)
    found = index.search(queries, 10, nprobe=20, largest=largest)
    assert torch.equal(found.indices, exact.indices)
    torch.testing.assert_close(found.values.double(), exact.values.double(), rtol=1e-5, atol=1e-4)
    few = index.search(queries, 10, nprobe=2, largest=largest)
    assert 0.5 < recall_at_k(few.indices, exact.indices) <= 1.0  # the approximation, measured


def test_an_8_bit_index_reopens_and_is_refused_for_a_rebuilt_store(tmp_path):
    store, _ = clustered_store(tmp_path / "s")
    index = ApproximateIndex.build(store, kind="ivf-sq8", nlist=20, show_progress=False)
    queries = torch.randn(5, WIDTH, generator=torch.Generator().manual_seed(2))
    exact = store.topk(queries, 10)
    found = index.search(queries, 10, nprobe=20)
    assert recall_at_k(found.indices, exact.indices) >= 0.9  # one byte a number
    again = ApproximateIndex.load(store).search(queries, 10, nprobe=20)
    assert torch.equal(again.indices, found.indices)
    (store.path / "manifest.json").write_text((store.path / "manifest.json").read_text() + " ")
    with pytest.raises(StoreMismatch, match="another manifest"):
        ApproximateIndex.load(store)
    for kwargs, match in (({"kind": "hnsw"}, "kind"), ({"nlist": ROWS + 1}, "nlist"), ({"train_rows": 5}, "train_rows")):
        with pytest.raises(ValueError, match=match):
            ApproximateIndex.build(store, save=False, **{"nlist": 20, **kwargs})
    for bad, match in ((torch.zeros(2, WIDTH + 1), "queries"), (torch.full((1, WIDTH), float("nan")), "NaN")):
        with pytest.raises(ValueError, match=match):
            index.search(bad, 3)
    with pytest.raises(ValueError, match="k:"):
        index.search(queries, 0)
