import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from attrib_torch import AttributionTask, RPSAttributor


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 16), nn.Tanh())
        self.encoder = nn.Module()
        self.encoder.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.encoder.head(self.body(x))


def ce(logits, labels):
    return nn.functional.cross_entropy(logits, labels)


class TopLevel(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10, bias=False))


class Alone(nn.Linear):
    """A model that is its own final layer (module name "")."""

    def __init__(self):
        super().__init__(64, 10)


@pytest.mark.parametrize("make,name,normalize,fit_to", [
    (Nested, "encoder.head", False, "labels"), (Nested, "encoder.head", True, "labels"),
    (TopLevel, "2", False, "labels"), (Alone, "", False, "labels"),
    (Nested, "encoder.head", False, "predictions"), (Nested, "encoder.head", True, "predictions")])
def test_representer_decomposition_is_exact_after_fine_tuning(problem, make, name, normalize, fit_to):
    torch.manual_seed(0)
    model = make().double()
    task = AttributionTask(lambda p, d: ce(torch.func.functional_call(model, p, (d[0],)), d[1]), model,
                           {k: v.clone() for k, v in model.state_dict().items()}, target_func=ce)
    rps = RPSAttributor(task, name, normalize_preactivate=normalize, l2_strength=0.01, epoch=500, fit_to=fit_to)
    train = DataLoader(TensorDataset(problem.x_train, problem.y_train), batch_size=40)
    test = DataLoader(TensorDataset(problem.x_test, problem.y_test), batch_size=10)
    rps.cache(train)
    scores = rps.attribute(train, test)
    assert scores.shape == (120, 25)
    # The shares add up to the fine-tuned layer's logit for each test example's label, bias included.
    features, labels = rps._features(test)
    logits = features @ rps.weight.T
    torch.testing.assert_close(scores.double().sum(0), logits.gather(1, labels[:, None]).squeeze(1),
                               rtol=1e-5, atol=1e-6)
    full = rps.attribute(train, train)
    torch.testing.assert_close(rps.self_attribute(train), torch.diagonal(full), rtol=1e-5, atol=1e-6)
    for proponents in (True, False):
        top = rps.topk(test, 5, proponents=proponents)
        order = torch.sort(scores.T, dim=1, descending=proponents, stable=True)
        torch.testing.assert_close(top.values, order.values[:, :5], rtol=1e-5, atol=1e-6)


def test_fit_to_predictions_fits_the_models_own_distribution(problem):
    # At the fine-tuned weight, α_i = -(softmax(W f_i) - p_i) / (2 λ n) with p_i the model's own prediction,
    # computed here by a plain forward pass of the unchanged model.
    torch.manual_seed(0)
    model = Nested().double()
    task = AttributionTask(lambda p, d: ce(torch.func.functional_call(model, p, (d[0],)), d[1]), model,
                           {k: v.clone() for k, v in model.state_dict().items()}, target_func=ce)
    rps = RPSAttributor(task, "encoder.head", normalize_preactivate=True, l2_strength=0.01, epoch=500,
                        fit_to="predictions")
    rps.cache(DataLoader(TensorDataset(problem.x_train, problem.y_train), batch_size=40))
    with torch.no_grad():
        p = torch.softmax(model(problem.x_train.double()), dim=1)
    features = rps._features(DataLoader(TensorDataset(problem.x_train, problem.y_train), batch_size=40))[0]
    expected = -(torch.softmax(features @ rps.weight.T, dim=1) - p) / (2 * 0.01 * len(p))
    torch.testing.assert_close(rps.alpha, expected, rtol=1e-10, atol=1e-12)
    labels = RPSAttributor(task, "encoder.head", normalize_preactivate=True, l2_strength=0.01, epoch=500)
    labels.cache(DataLoader(TensorDataset(problem.x_train, problem.y_train), batch_size=40))
    assert not torch.allclose(labels.alpha, rps.alpha)  # a different surrogate


def test_bad_layer_names(problem):
    model = Nested().double()
    task = AttributionTask(lambda p, d: 0, model, model.state_dict(), target_func=ce)
    with pytest.raises(ValueError, match="not an nn.Linear"):
        RPSAttributor(task, "body")
    with pytest.raises(ValueError, match="not a module"):
        RPSAttributor(task, "decoder")
    with pytest.raises(ValueError, match="l2_strength"):
        RPSAttributor(task, "encoder.head", l2_strength=0.0)
    with pytest.raises(ValueError, match="fit_to"):
        RPSAttributor(task, "encoder.head", fit_to="logits")


@pytest.mark.parametrize("fit_to", ["labels", "predictions"])
def test_binary_head_with_bce(problem, fit_to):
    """nn.Linear(d, 1) with BCE-with-logits: each test logit splits exactly, signed towards the test label."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    y = (problem.y_train >= 5).long()
    y_test = (problem.y_test >= 5).long()

    def bce(logits, targets):
        return nn.functional.binary_cross_entropy_with_logits(logits, targets)

    task = AttributionTask(lambda p, d: None, model, model.state_dict(), target_func=bce)
    rps = RPSAttributor(task, "2", l2_strength=0.01, epoch=300, fit_to=fit_to)
    train = DataLoader(TensorDataset(problem.x_train, y), batch_size=40)
    test = DataLoader(TensorDataset(problem.x_test, y_test), batch_size=10)
    scores = rps.attribute(train, test)
    features, _ = rps._features(test)
    logit = (features @ rps.weight.T).squeeze(1)
    sign = (2 * y_test - 1).double()
    torch.testing.assert_close(scores.double().sum(0), sign * logit, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rps.self_attribute(train), torch.diagonal(rps.attribute(train, train)),
                               rtol=1e-5, atol=1e-6)
    top = rps.topk(test, 4)
    torch.testing.assert_close(top.values, torch.sort(scores.T, dim=1, descending=True).values[:, :4])
    with pytest.raises(ValueError, match="labels 0 or 1"):
        rps.attribute(train, DataLoader(TensorDataset(problem.x_test, problem.y_test), batch_size=10))
