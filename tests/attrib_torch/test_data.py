import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from attrib_torch.data import _sliced, batches


@pytest.mark.parametrize("batch_size,drop_last", [(1, False), (4, False), (4, True), (10, False), (11, True)])
def test_tensor_dataset_slices_equal_the_loader(batch_size, drop_last):
    data = TensorDataset(torch.randn(10, 3), torch.arange(10))
    loader = DataLoader(data, batch_size=batch_size, drop_last=drop_last)
    assert _sliced(loader) is not None
    expected = list(loader)
    if not expected:  # drop_last with fewer examples than a batch: nothing to attribute
        with pytest.raises(ValueError, match="no batches"):
            list(batches(loader, torch.device("cpu")))
        return
    got = list(batches(loader, torch.device("cpu")))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_other_loaders_are_iterated_as_they_are():
    data = TensorDataset(torch.randn(6, 2), torch.arange(6))
    collate = DataLoader(data, batch_size=2, collate_fn=lambda items: items)
    assert _sliced(collate) is None
    assert _sliced([(torch.zeros(2),)]) is None
    assert len(list(batches(collate, torch.device("cpu")))) == 3


def test_batches_pass_again_group_select_and_give_random_access():
    from attrib_torch.data import Batches, Mapped, Selected, random_access

    data = TensorDataset(torch.arange(10.0)[:, None], torch.arange(10))
    loader = DataLoader(data, batch_size=3)
    cpu = torch.device("cpu")
    source = Batches(loader, cpu)
    assert [b[1].tolist() for b in source] == [b[1].tolist() for b in source] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert [b[1].tolist() for b in Batches(loader, cpu, limit=2)] == [[0, 1, 2], [3, 4, 5]]
    # groups of at most 7 examples; a batch never split
    assert [b[1].tolist() for b in Batches(loader, cpu, max_examples=7)] == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert [b[1].tolist() for b in Batches(loader, cpu, max_examples=2)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    chosen = Selected(source, torch.tensor([9, 0, 4, 5]))
    assert [b[1].tolist() for b in chosen] == [[0], [4, 5], [9]] == [b[1].tolist() for b in chosen]
    assert [b[1].tolist() for b in Mapped(source, lambda i, b: (b[0], b[1] * 0 + i))] == [[0] * 3, [1] * 3, [2] * 3, [3]]
    rows, n = random_access(DataLoader(torch.utils.data.Subset(data, [7, 3, 1]), batch_size=2), cpu)
    assert n == 3 and rows(torch.tensor([2, 0]))[1].tolist() == [1, 7]
    assert random_access([(torch.zeros(2),)], cpu) is None
