import pytest
import torch
from torch import nn
from torch.func import functional_call

from attrib_torch import (
    AttributionTask,
    FunctionalGradientComputer,
    ImageClassificationModelOutput,
    IterativeGradientComputer,
    TracInAttributor,
)


def model_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    return model, (x, y)


def autograd_margins(model, batch, names):
    out = ImageClassificationModelOutput()
    params = dict(model.named_parameters())
    rows = []
    for i in range(len(batch[1])):
        margin = out.get_output(model, params, dict(model.named_buffers()), batch[0][i : i + 1], batch[1][i : i + 1])
        grads = torch.autograd.grad(margin, [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("grad_wrt", [None, ["2.weight", "2.bias"]])
def test_functional_and_iterative_agree_with_an_autograd_loop(grad_wrt):
    model, batch = model_and_batch()
    names = grad_wrt or [n for n, _ in model.named_parameters()]
    task = ImageClassificationModelOutput()
    functional = FunctionalGradientComputer(model, task, 0, torch.float64, "cpu", grad_wrt=grad_wrt)
    iterative = IterativeGradientComputer(model, task, 0, torch.float64, "cpu", grad_wrt=grad_wrt)
    grads = functional.compute_per_sample_grad(batch)
    assert list(grads) == names
    flat = torch.cat([grads[n].reshape(7, -1) for n in names], dim=1)
    expected = autograd_margins(model, batch, names)
    torch.testing.assert_close(flat, expected)
    torch.testing.assert_close(iterative.compute_per_sample_grad(batch), expected)
    p = torch.softmax(model(batch[0]), dim=1).gather(1, batch[1][:, None])
    torch.testing.assert_close(functional.compute_loss_grad(batch), 1 - p)
    with pytest.raises(ValueError, match="grad_wrt"):
        FunctionalGradientComputer(model, task, 0, torch.float64, "cpu", grad_wrt=["3.weight"])


class ItemModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3).double()

    def forward(self, x):
        out = self.fc(x)
        return out * 2 if out.sum().item() > 0 else out


def test_attributors_fall_back_to_a_loop_with_a_warning():
    torch.manual_seed(1)
    model = ItemModel()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))

    def loss(params, data):
        return nn.functional.cross_entropy(functional_call(model, params, (data[0],)), data[1])

    task = AttributionTask(loss, model, {k: v.clone() for k, v in model.state_dict().items()})
    attributor = TracInAttributor(task, [1.0], normalized_grad=False, show_progress=False)
    with pytest.warns(UserWarning, match="vmap cannot trace"):
        scores = attributor.attribute([(x, y)], [(x[:2], y[:2])])
    params = {k: v.detach() for k, v in model.named_parameters()}
    rows = []
    for i in range(6):
        live = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        g = torch.autograd.grad(loss(live, (x[i : i + 1], y[i : i + 1])), list(live.values()))
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    G = torch.stack(rows)
    torch.testing.assert_close(scores, G @ G[:2].T)
