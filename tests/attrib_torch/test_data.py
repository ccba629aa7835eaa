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
