import pytest
import torch
from torch import nn
from torch.func import functional_call

from attrib_torch import AttributionTask


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.encoder(x))


@pytest.fixture()
def setting():
    torch.manual_seed(0)
    model = Net().double()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def loss(params, data):
        x, y = data
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    def target(params, data):
        x, y = data
        return functional_call(model, params, (x,)).gather(1, y[:, None]).sum()

    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    return model, state, loss, target, (x, y)


def test_get_param_flat_split_and_layer(setting):
    model, state, loss, target, data = setting
    task = AttributionTask(loss, model, state)
    flat, none = task.get_param()
    assert none is None
    assert torch.equal(flat, torch.cat([v.reshape(-1) for v in state.values()]))
    parts, layer_map = task.get_param(layer_split=True)
    assert layer_map == [0, 0, 1, 1]  # encoder.0.{weight,bias}, head.{weight,bias}
    assert torch.equal(parts[1], torch.cat([state["head.weight"].reshape(-1), state["head.bias"]]))
    head, _ = task.get_param(layer_name="head")
    assert torch.equal(head, parts[1])
    custom, given = task.get_param(layer_split=True, param_layer_map=[0, 1, 1, 1])
    assert given == [0, 1, 1, 1] and len(custom) == 2
    with pytest.raises(ValueError, match="param_layer_map"):
        task.get_param(layer_split=True, param_layer_map=[0, 1])
    with pytest.raises(ValueError, match="names"):
        task.get_param(layer_name="decoder")


def test_loss_and_target_functions_with_and_without_layer_name(setting):
    model, state, loss, target, data = setting
    task = AttributionTask(loss, model, state, target_func=target)
    params = dict(model.named_parameters())
    flat, _ = task.get_param()
    torch.testing.assert_close(task.get_loss_func()(flat, data), loss(params, data))
    torch.testing.assert_close(task.get_target_func()(flat, data), target(params, data))
    torch.testing.assert_close(task.get_loss_func(flatten=False)(params, data), loss(params, data))
    head = {"head.weight": state["head.weight"] * 2, "head.bias": state["head.bias"]}
    expected = loss({**params, **head}, data)
    torch.testing.assert_close(task.get_loss_func(flatten=False, layer_name="head")(head, data), expected)
    flat_head = torch.cat([head["head.weight"].reshape(-1), head["head.bias"]])
    torch.testing.assert_close(task.get_loss_func(layer_name="head", ckpt_idx=0)(flat_head, data), expected)


def test_per_example_gradients_without_unsqueeze(setting):
    model, state, loss, target, data = setting
    task = AttributionTask(loss, model, state, target_func=target)
    x, y = data
    for grad_func, func in ((task.get_grad_loss_func(), loss), (task.get_grad_target_func(layer_name="head"), target)):
        names = list(state) if func is loss else ["head.weight", "head.bias"]
        flat = torch.cat([state[n].reshape(-1) for n in names])
        got = grad_func(flat, data)
        rows = []
        for i in range(len(y)):
            live = {k: v.clone().requires_grad_(k in names) for k, v in state.items()}
            value = func(live, (x[i : i + 1], y[i : i + 1]))
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, [live[n] for n in names])]))
        torch.testing.assert_close(got, torch.stack(rows))


def test_register_forward_hook_captures_layer_outputs(setting):
    model, state, loss, target, data = setting
    task = AttributionTask(loss, model, state)
    capture = task.register_forward_hook(["encoder", "head"])
    encoded, logits = capture(data)
    torch.testing.assert_close(encoded, model.encoder(data[0]))
    torch.testing.assert_close(logits, model(data[0]))
    (single,) = task.register_forward_hook("head")(data)  # a string is one name
    torch.testing.assert_close(single, logits)
    assert not model.head._forward_hooks  # the hooks are gone
    with pytest.raises(ValueError, match="decoder"):
        task.register_forward_hook("decoder")


def test_checkpoints_loaded_once_and_switched(setting, tmp_path, monkeypatch):
    model, state, loss, target, data = setting
    other = {k: v + 1 for k, v in state.items()}
    paths = [tmp_path / "a.pt", tmp_path / "b.pt"]
    torch.save(state, paths[0])
    torch.save(other, paths[1])
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(a[0]) or real_load(*a, **k))
    task = AttributionTask(loss, model, [str(p) for p in paths])
    assert task.get_checkpoints() == [str(p) for p in paths] and task.get_model() is model
    for _ in range(3):
        a, _ = task.get_param(0)
        b, _ = task.get_param(1)
    assert len(reads) == 2
    assert torch.equal(a, torch.cat([v.reshape(-1) for v in state.values()]))
    assert torch.equal(b, torch.cat([v.reshape(-1) for v in other.values()]))


def test_custom_load_function(setting):
    model, state, loss, target, data = setting
    calls = []

    def load(m, checkpoint):
        calls.append(checkpoint)
        m.load_state_dict({k: v * checkpoint for k, v in state.items()})
        return m

    task = AttributionTask(loss, model, [state, state], checkpoints_load_func=lambda m, c: load(m, 2.0))
    flat, _ = task.get_param(1)
    assert torch.equal(flat, 2.0 * torch.cat([v.reshape(-1) for v in state.values()]))
    task.get_param(0)
    task.get_param(1)
    assert len(calls) == 2


def test_bad_arguments(setting):
    model, state, loss, target, data = setting
    with pytest.raises(TypeError, match="loss_func"):
        AttributionTask(3, model, state)
    with pytest.raises(TypeError, match="model"):
        AttributionTask(loss, "model", state)
    with pytest.raises(ValueError, match="empty"):
        AttributionTask(loss, model, [])
    with pytest.raises(ValueError, match="does not exist"):
        AttributionTask(loss, model, ["/nope.pt"])
    with pytest.raises(ValueError, match="ckpt_idx"):
        AttributionTask(loss, model, state).get_param(ckpt_idx=1)


def test_a_live_state_dict_checkpoint_is_not_overwritten_by_the_next(setting):
    model, state, loss, target, data = setting
    other = {k: v + 1 for k, v in state.items()}
    task = AttributionTask(loss, model, [model.state_dict(), other])
    first, _ = task.get_param(0)
    task.get_param(1)
    again, _ = task.get_param(0)
    assert torch.equal(first, again)


def test_samplers_with_a_fixed_order_are_accepted_and_random_ones_refused():
    from torch.utils.data import (DataLoader, IterableDataset, Sampler, SubsetRandomSampler, TensorDataset,
                                  WeightedRandomSampler)

    from attrib_torch.data import check_loader

    ds = TensorDataset(torch.arange(8.0))
    for sampler in (SubsetRandomSampler(range(8)), WeightedRandomSampler([1.0] * 8, 8)):
        with pytest.raises(ValueError, match="fixed order"):
            check_loader(DataLoader(ds, sampler=sampler), "train_dataloader")

    class Shuffling(Sampler):  # random without saying so: caught by two passes over its indices
        def __iter__(self):
            return iter(torch.randperm(8).tolist())

        def __len__(self):
            return 8

    with pytest.raises(ValueError, match="different order on two passes"):
        check_loader(DataLoader(ds, sampler=Shuffling()), "train_dataloader")
    check_loader(DataLoader(ds, batch_size=3), "train_dataloader")
    check_loader(DataLoader(ds, sampler=[5, 1, 2, 7], batch_size=2), "train_dataloader")  # a fixed subset
    check_loader(DataLoader(ds, batch_sampler=[[0, 1, 2], [3], [4, 5, 6, 7]]), "train_dataloader")  # buckets

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(torch.arange(8.0))

    check_loader(DataLoader(Stream(), batch_size=4), "train_dataloader")
    with pytest.raises(ValueError, match="batch_size=None"):
        check_loader(DataLoader(ds, batch_size=None), "train_dataloader")
    with pytest.raises(ValueError, match="empty"):
        check_loader(DataLoader(TensorDataset(torch.zeros(0)), batch_size=2), "train_dataloader")
    with pytest.raises(ValueError, match="no batches"):
        check_loader([], "test_dataloader")
