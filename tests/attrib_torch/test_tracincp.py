"""Captum-style TracInCP against a brute-force loop of torch.autograd.grad over examples and checkpoints."""

import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from attrib_torch import KMostInfluentialResults, TracInCP, TracInCPFast, TracInCPFastRandProj
from attrib_core import side_seed
from kernels import projection_entries
from tests.helpers import classification_batch, small_mlp

RATES = (0.5, 0.2, 1.3)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    model = small_mlp(4, (6, 7, 3))
    x, y = classification_batch(8, 40, 6, 3)
    directory = tmp_path_factory.mktemp("checkpoints")
    paths = []
    for c, rate in enumerate(RATES):
        state = {k: v * (0.6 + 0.2 * c) for k, v in model.state_dict().items()}
        path = os.path.join(directory, f"ckpt-{c * 5}.pt")  # ckpt-0, ckpt-5, ckpt-10: natural order
        torch.save({"model_state_dict": state, "learning_rate": rate}, path)
        paths.append(path)
    return model, (x[:30], y[:30]), (x[30:], y[30:]), str(directory), paths


def brute_force(model, paths, train, test, params=None):
    """``(n_test, n_train)``: Σ_c lr_c ⟨∇ loss_train, ∇ loss_test⟩, one example at a time."""
    total = 0
    for path in paths:
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["model_state_dict"])
        names = params or [n for n, _ in model.named_parameters()]

        def grads(x, y):
            rows = []
            for i in range(len(y)):
                loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
                g = torch.autograd.grad(loss, [dict(model.named_parameters())[n] for n in names])
                rows.append(torch.cat([t.reshape(-1) for t in g]))
            return torch.stack(rows)

        total = total + saved["learning_rate"] * grads(*test) @ grads(*train).T
    return total


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("source", ["directory", "list", "iterator"])
def test_scores_self_influence_and_topk_equal_the_loop(setting, reduction, source):
    model, train, test, directory, paths = setting
    checkpoints = {"directory": directory, "list": list(reversed(paths)), "iterator": iter(paths)}[source]
    tracin = TracInCP(model, TensorDataset(*train), checkpoints, loss_fn=nn.CrossEntropyLoss(reduction=reduction),
                      batch_size=8, sample_wise_grads_per_batch=reduction != "none")
    expected = brute_force(model, paths, train, test)
    scores = tracin.influence(test)
    assert scores.shape == (10, 30)
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(tracin.self_influence(), brute_force(model, paths, train, train).diagonal())
    torch.testing.assert_close(tracin.self_influence(test), brute_force(model, paths, test, test).diagonal())
    for proponents in (True, False):
        top = tracin.influence(test, k=4, proponents=proponents)
        assert isinstance(top, KMostInfluentialResults)
        reference = torch.topk(expected, 4, dim=1, largest=proponents)
        torch.testing.assert_close(top.influence_scores, reference.values)
        assert torch.equal(top.indices, reference.indices)


def test_layers_restrict_the_gradient_and_a_dataloader_is_accepted(setting):
    model, train, test, directory, paths = setting
    loader = DataLoader(TensorDataset(*train), batch_size=7)
    tracin = TracInCP(model, loader, paths, layers=["2"], loss_fn=nn.CrossEntropyLoss(reduction="none"))
    torch.testing.assert_close(tracin.influence(test), brute_force(model, paths, train, test, ["2.weight", "2.bias"]))


def test_fast_variants_equal_their_closed_forms(setting):
    model, train, test, directory, paths = setting
    fast = TracInCPFast(model, "2", TensorDataset(*train), paths, loss_fn=nn.CrossEntropyLoss(reduction="sum"),
                        batch_size=16)
    expected = brute_force(model, paths, train, test, ["2.weight"])
    torch.testing.assert_close(fast.influence(test), expected)
    assert fast._attributor._factored  # from layer inputs and output gradients, no per-example weight gradients
    # The closed form itself: (a_i·a_j)(ds_i·ds_j) with ds = softmax - onehot, summed over checkpoints.
    closed = 0
    for path in paths:
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["model_state_dict"])

        def factors(x, y):
            a = torch.tanh(model[0](x))
            return a, torch.softmax(model[2](a), 1) - nn.functional.one_hot(y, 3)

        (a, ds), (b, dt) = factors(*test), factors(*train)
        closed = closed + saved["learning_rate"] * (a @ b.T) * (ds @ dt.T)
    torch.testing.assert_close(fast.influence(test), closed.detach())
    top = fast.influence(test, k=3, proponents=False)
    assert torch.equal(top.indices, torch.topk(expected, 3, dim=1, largest=False).indices)

    projected = TracInCPFastRandProj(model, model[2], TensorDataset(*train), paths,
                                     loss_fn=nn.CrossEntropyLoss(reduction="mean"), batch_size=16,
                                     projection_dim=5, seed=11)
    # captum's sizes: below the weight's 3 x 7 entries each factor goes to int(sqrt(5)) = 2 dimensions at most;
    # the oracle materialises both matrices and forms R_outᵀ G R_in explicitly.
    R_in = projection_entries(7, 2, seed=side_seed(11, "2", "in")).double()
    R_out = projection_entries(3, 2, seed=side_seed(11, "2", "out")).double()

    def compressed(rows):
        return torch.einsum("ok,nod,dj->nkj", R_out, rows.reshape(-1, 3, 7), R_in).reshape(rows.shape[0], 4)

    rows = []
    for path in paths:
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["model_state_dict"])
        rows.append(saved["learning_rate"] * compressed(brute_force_rows(model, *test))
                    @ compressed(brute_force_rows(model, *train)).T)
    torch.testing.assert_close(projected.influence(test), sum(rows))
    assert projected.compute_intermediate_quantities(test).shape == (10, 3 * 4)  # 2 x 2 per checkpoint
    exact = TracInCPFastRandProj(model, model[2], TensorDataset(*train), paths,
                                 loss_fn=nn.CrossEntropyLoss(reduction="mean"), batch_size=16, projection_dim=21)
    torch.testing.assert_close(exact.influence(test), fast.influence(test))  # at the weight's size: exact


def test_fast_on_a_model_that_is_its_final_layer(setting):
    _, train, test, _, _ = setting
    model = nn.Linear(6, 3).double()
    path = os.path.join(os.path.dirname(setting[4][0]), "..", "linear.pt")
    torch.save(model.state_dict(), path)
    fast = TracInCPFast(model, model, TensorDataset(*train), [path], loss_fn=nn.CrossEntropyLoss(), batch_size=8)
    g_test = torch.stack([torch.autograd.grad(nn.functional.cross_entropy(model(test[0][i : i + 1]),
                                                                          test[1][i : i + 1]), model.weight)[0]
                          for i in range(10)]).reshape(10, -1)
    g_train = torch.stack([torch.autograd.grad(nn.functional.cross_entropy(model(train[0][i : i + 1]),
                                                                           train[1][i : i + 1]), model.weight)[0]
                           for i in range(30)]).reshape(30, -1)
    torch.testing.assert_close(fast.influence(test), g_test @ g_train.T)  # default load: learning rate 1


def brute_force_rows(model, x, y):
    rows = []
    for i in range(len(y)):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.autograd.grad(loss, model[2].weight)[0].reshape(-1))
    return torch.stack(rows)


def test_bad_input_is_refused_before_computing(setting, tmp_path):
    model, train, test, directory, paths = setting
    data = TensorDataset(*train)
    per_example = nn.CrossEntropyLoss(reduction="none")
    with pytest.raises(ValueError, match="holds no checkpoint"):
        TracInCP(model, data, str(tmp_path), loss_fn=per_example)
    with pytest.raises(ValueError, match="layers"):
        TracInCP(model, data, paths, layers=["decoder"], loss_fn=per_example)
    with pytest.raises(ValueError, match="sample_wise_grads_per_batch"):
        TracInCP(model, data, paths, loss_fn=nn.CrossEntropyLoss(reduction="sum"))
    with pytest.raises(ValueError, match="sample_wise_grads_per_batch"):
        TracInCP(model, data, paths, loss_fn=per_example, sample_wise_grads_per_batch=True)
    with pytest.raises(ValueError, match="final_fc_layer"):
        TracInCPFast(model, "1", data, paths, loss_fn=nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="reduction must be"):
        TracInCPFast(model, "2", data, paths, loss_fn=per_example)
    tracin = TracInCP(model, data, paths, loss_fn=per_example)
    with pytest.raises(ValueError, match="k: expected an integer >= 1"):
        tracin.influence(test, k=0)
    with pytest.raises(ValueError, match="inputs: the model"):
        tracin.influence((torch.randn(4, 9, dtype=torch.float64), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ValueError, match="inputs: expected a tuple"):
        tracin.influence(test[0])


def test_captum_surface(setting):
    """captum 0.9: get_name, k above the training set, influence(None) refused, aggregate, intermediate quantities."""
    model, train, test, directory, paths = setting
    tracin = TracInCP(model, TensorDataset(*train), directory, loss_fn=nn.CrossEntropyLoss(reduction="sum"),
                      batch_size=8, sample_wise_grads_per_batch=True)
    assert TracInCP.get_name() == "TracInCP" and tracin.get_name() == "TracInCP"
    assert TracInCPFastRandProj.get_name() == "TracInCPFastRandProj"
    expected = brute_force(model, paths, train, test)
    with pytest.raises(ValueError, match="self_influence"):
        tracin.influence(None)
    everything = tracin.influence(test, k=1000)
    assert everything.indices.shape == (10, 30)
    torch.testing.assert_close(everything.influence_scores, torch.sort(expected, dim=1, descending=True).values)
    torch.testing.assert_close(tracin.influence(test, aggregate=True), expected.sum(0, keepdim=True))
    top = tracin.influence(test, k=3, proponents=False, aggregate=True)
    assert torch.equal(top.indices, torch.topk(expected.sum(0), 3, largest=False).indices[None])
    loader = DataLoader(TensorDataset(*test), batch_size=4)
    torch.testing.assert_close(tracin.influence(loader), expected)
    train_vectors = tracin.compute_intermediate_quantities(DataLoader(TensorDataset(*train), batch_size=7))
    test_vectors = tracin.compute_intermediate_quantities(test)
    torch.testing.assert_close(test_vectors @ train_vectors.T, expected)
    summed = tracin.compute_intermediate_quantities(test, aggregate=True)
    torch.testing.assert_close(summed, test_vectors.sum(0, keepdim=True))
    torch.testing.assert_close(tracin.self_influence(outer_loop_by_checkpoints=True), tracin.self_influence())
    fast = TracInCPFast(model, "2", TensorDataset(*train), directory, loss_fn=nn.CrossEntropyLoss(reduction="sum"),
                        batch_size=8)
    torch.testing.assert_close(fast.compute_intermediate_quantities(test) @
                               fast.compute_intermediate_quantities(train).T, fast.influence(test))


def test_progress_bars_are_described_as_captum_describes_them(setting, monkeypatch):
    import attrib_torch.base as base
    import attrib_torch.data as data

    model, train, test, directory, paths = setting
    seen = []
    real = data.tqdm

    def recording(iterable, desc=None, disable=False, **kwargs):
        if not disable:
            seen.append(desc)
        return real(iterable, desc=desc, disable=True, **kwargs)

    monkeypatch.setattr(data, "tqdm", recording)  # the bars over batches
    monkeypatch.setattr(base, "tqdm", recording)  # the bar over checkpoints
    tracin = TracInCP(model, TensorDataset(*train), directory, loss_fn=nn.CrossEntropyLoss(reduction="sum"),
                      batch_size=8, sample_wise_grads_per_batch=True)
    tracin.influence(test, show_progress=True)
    assert "Using TracInCP to compute influence for training batches" in seen
    tracin.self_influence(show_progress=True)
    assert "Using TracInCP to compute self influence. Processing batch" in seen
    fast = TracInCPFast(model, "2", TensorDataset(*train), directory, loss_fn=nn.CrossEntropyLoss(reduction="sum"),
                        batch_size=8)
    fast.influence(test, k=2, proponents=False, show_progress=True)
    assert "Using TracInCPFast to perform computation for getting opponents. Processing training batches" in seen
    tracin.self_influence(show_progress=True, outer_loop_by_checkpoints=True)
    assert "Using TracInCP to compute self influence. Processing checkpoint" in seen


@pytest.mark.parametrize("cls", [TracInCP, TracInCPFast, TracInCPFastRandProj])
def test_the_constructor_and_calls_hand_the_model_back_and_list_its_checkpoints(setting, cls):
    _, train, test, directory, paths = setting
    model = small_mlp(9, (6, 7, 3))  # its own weights, none of the checkpoints'
    before = {k: v.clone() for k, v in model.state_dict().items()}
    extra = {"final_fc_layer": "2"} if cls is not TracInCP else {"sample_wise_grads_per_batch": True}
    if cls is TracInCPFastRandProj:
        extra["projection_dim"] = 4
    tracin = cls(model, train_dataset=TensorDataset(*train), checkpoints=directory,
                 loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=8, **extra)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    tracin.influence(test)
    tracin.self_influence()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert tracin.checkpoints == sorted(paths, key=lambda p: int(p.rsplit("-", 1)[1].split(".")[0]))
