"""LayerFeatureAblation against closed forms and plain loops that ablate by hand and rerun the model."""

import pytest
import torch
from torch import nn

from attrib_torch.layer_ablation import LayerFeatureAblation

DT = torch.float64
B = 4


class Linear2(nn.Module):
    """``fc2(hidden(fc1(x)))``: ablating hidden neuron ``i`` to ``b_i`` lowers the output by ``w_i (a_i - b_i)``."""

    def __init__(self, d=3, h=5, out=1):
        super().__init__()
        self.fc1, self.hidden, self.fc2 = nn.Linear(d, h), nn.Identity(), nn.Linear(h, out)

    def forward(self, x):
        return self.fc2(self.hidden(self.fc1(x)))


class InplaceTanh(nn.Module):
    def forward(self, x):
        return x.tanh_()


class Deep(nn.Module):
    """``fc3(tanh(fc2(tanh(fc1(x)))))``: ablations of ``fc2``'s input or output do not add up."""

    def __init__(self, d=3, h=5, out=3, inplace=False):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, h), nn.Linear(h, h), nn.Linear(h, out)
        self.act = InplaceTanh() if inplace else nn.Tanh()

    def forward(self, x):
        return self.fc3(self.act(self.fc2(torch.tanh(self.fc1(x)))))


def make(cls, **kwargs):
    torch.manual_seed(0)
    return cls(**kwargs).to(DT)


def x_of(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=DT)


def loop_oracle(rest, value, groups, baseline=0.0):
    """Replace each group of ``value`` (``groups`` of its shape) by ``baseline``, rerun ``rest``, take the drop."""
    expected = torch.zeros_like(value)
    for g in torch.unique(groups).tolist():
        chosen = groups == g
        drop = rest(value) - rest(torch.where(chosen, torch.as_tensor(baseline, dtype=value.dtype), value))
        expected = torch.where(chosen, drop.reshape(-1, *[1] * (value.dim() - 1)), expected)
    return expected


def neurons(value):
    return torch.arange(value[0].numel()).reshape(value.shape[1:]).expand(value.shape)


def test_hidden_neuron_attribution_is_weight_times_activation():
    model, x = make(Linear2), x_of(B, 3)
    a, w = model.fc1(x).detach(), model.fc2.weight[0].detach()
    ablator = LayerFeatureAblation(model, model.hidden)
    baseline = torch.linspace(-1, 1, 5, dtype=DT)
    with torch.no_grad():
        torch.testing.assert_close(ablator.attribute(x), w * a)
        torch.testing.assert_close(ablator.attribute(x, layer_baselines=0.5), w * (a - 0.5))
        torch.testing.assert_close(ablator.attribute(x, layer_baselines=baseline), w * (a - baseline))
        per_example = x_of(B, 5)
        torch.testing.assert_close(ablator.attribute(x, layer_baselines=per_example), w * (a - per_example))
        torch.testing.assert_close(LayerFeatureAblation(model, model.fc2).attribute(
            x, attribute_to_layer_input=True), w * a)


@pytest.mark.parametrize("per_eval", [1, 2, 3, 7])
def test_group_mask_matches_zeroing_the_group_and_rerunning(per_eval):
    model, x = make(Deep), x_of(B, 3)
    mask = torch.tensor([[0, 2, 0, 1, 2]])
    got = LayerFeatureAblation(model, model.fc2).attribute(
        x, target=1, layer_mask=mask, perturbations_per_eval=per_eval, layer_baselines=0.3
    )
    with torch.no_grad():
        a = model.fc2(torch.tanh(model.fc1(x)))
        expected = loop_oracle(lambda v: model.fc3(model.act(v))[:, 1], a, mask.expand(B, 5), 0.3)
    torch.testing.assert_close(got, expected)
    assert len(set(got[0].tolist())) == 3  # the groups differ, and neurons of a group agree


@pytest.mark.parametrize("per_eval", [1, 2, 3, 7])
def test_layer_input_matches_a_loop_over_input_neurons(per_eval):
    model, x = make(Deep), x_of(B, 3)
    got = LayerFeatureAblation(model, model.fc2).attribute(
        x, target=2, attribute_to_layer_input=True, perturbations_per_eval=per_eval
    )
    with torch.no_grad():
        h = torch.tanh(model.fc1(x))
        expected = loop_oracle(lambda v: model.fc3(model.act(model.fc2(v)))[:, 2], h, neurons(h))
    torch.testing.assert_close(got, expected)


def test_an_inplace_operation_after_the_layer_changes_nothing():
    model, x = make(Deep, inplace=True), x_of(B, 3)
    got = LayerFeatureAblation(model, model.fc2).attribute(x, target=0, perturbations_per_eval=2)
    with torch.no_grad():
        a = model.fc2(torch.tanh(model.fc1(x)))
        expected = loop_oracle(lambda v: model.fc3(torch.tanh(v))[:, 0], a, neurons(a))
    torch.testing.assert_close(got, expected)


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 2, 2), nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def test_a_trailing_mask_groups_rows_of_every_channel():
    model, x = make(Conv), x_of(3, 1, 4, 4)
    rows = torch.tensor([[[0, 0, 0], [1, 1, 1], [2, 2, 2]]])  # (1, 3, 3), broadcast over (B, 2, 3, 3)
    got = LayerFeatureAblation(model, model.conv).attribute(x, target=2, layer_mask=rows, perturbations_per_eval=2)
    with torch.no_grad():
        a = model.conv(x)
        expected = loop_oracle(lambda v: model.fc(torch.tanh(v).flatten(1))[:, 2], a, rows.expand(a.shape))
    torch.testing.assert_close(got, expected)


class TwoWay(nn.Module):
    """Two inputs and extra arguments, used before and after ``pair``, which takes two tensors and returns two."""

    class Pair(nn.Module):
        def forward(self, u, v):
            return u * torch.sigmoid(v), v - u

    def __init__(self):
        super().__init__()
        self.fx, self.fz, self.pair, self.head = nn.Linear(3, 4), nn.Linear(2, 4), self.Pair(), nn.Linear(8, 2)

    def forward(self, x, z, shift, scale):
        u, v = self.pair(self.fx(x), self.fz(z) + shift[:, None])
        return self.head(torch.cat([u, torch.tanh(v)], 1)) * scale * (2 + shift[:, None]) * torch.sigmoid(x[:, :1])


@pytest.mark.parametrize("to_input", [False, True])
@pytest.mark.parametrize("per_eval", [1, 3])
def test_several_inputs_extra_arguments_and_tuple_layers(to_input, per_eval):
    model = make(TwoWay)
    x, z, shift = x_of(B, 3), x_of(B, 2) + 1, torch.linspace(-1, 1, B, dtype=DT)
    got = LayerFeatureAblation(model, model.pair).attribute(
        (x, z), target=1, additional_forward_args=(shift, 2.0), attribute_to_layer_input=to_input,
        perturbations_per_eval=per_eval, layer_baselines=(0.0, 0.5),
    )
    assert isinstance(got, tuple) and len(got) == 2
    with torch.no_grad():
        u, v = model.fx(x), model.fz(z) + shift[:, None]
        if not to_input:
            u, v = model.pair(u, v)

        def rest(u, v):
            if to_input:
                u, v = model.pair(u, v)
            return model.head(torch.cat([u, torch.tanh(v)], 1))[:, 1] * 2.0 * (2 + shift) * torch.sigmoid(x[:, 0])

        expected = (loop_oracle(lambda w: rest(w, v), u, neurons(u)),
                    loop_oracle(lambda w: rest(u, w), v, neurons(v), 0.5))
    torch.testing.assert_close(got, expected)


def test_an_extra_tensor_without_the_batch_dimension_is_not_repeated():
    model, x = make(Linear2, h=3), x_of(B, 3)
    mix = x_of(3, 3)  # mixes the hidden units after the layer; (3, 3), not (B, ...)

    def forward(x, mix):
        return model.fc2(model.hidden(model.fc1(x)) @ mix)

    ablator = LayerFeatureAblation(forward, model.hidden)
    got = ablator.attribute(x, additional_forward_args=mix, perturbations_per_eval=3)
    with torch.no_grad():
        torch.testing.assert_close(got, (mix @ model.fc2.weight[0]) * model.fc1(x))


class Cube(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 5), nn.Linear(5, 6)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))).reshape(-1, 2, 3)


def targeted(model, layer, pick):
    """The same model with its output indexed by ``pick(out)``: the oracle for ``target``."""
    return LayerFeatureAblation(lambda x: pick(model(x)), layer)


@pytest.mark.parametrize(
    "target, pick",
    [
        (2, lambda out: out[:, 2]),
        (-1, lambda out: out[:, -1]),
        (torch.tensor(1), lambda out: out[:, 1]),
        ([0, 2, 1, 1], lambda out: out[torch.arange(B), [0, 2, 1, 1]]),
        (torch.tensor([2, 0, 0, 1]), lambda out: out[torch.arange(B), [2, 0, 0, 1]]),
    ],
)
def test_targets_of_a_2d_output_select_like_indexing(target, pick):
    model, x = make(Deep), x_of(B, 3)
    got = LayerFeatureAblation(model, model.fc2).attribute(x, target=target, perturbations_per_eval=3)
    torch.testing.assert_close(got, targeted(model, model.fc2, pick).attribute(x))


@pytest.mark.parametrize(
    "target, pick",
    [
        ((1, 2), lambda out: out[:, 1, 2]),
        ([(0, 1), (1, 0), (1, 2), (0, 0)], lambda out: out[torch.arange(B), [0, 1, 1, 0], [1, 0, 2, 0]]),
    ],
)
def test_targets_of_a_3d_output_select_like_indexing(target, pick):
    model, x = make(Cube), x_of(B, 3)
    got = LayerFeatureAblation(model, model.fc1).attribute(x, target=target, perturbations_per_eval=2)
    torch.testing.assert_close(got, targeted(model, model.fc1, pick).attribute(x))
    with torch.no_grad():
        a = model.fc1(x)
        expected = loop_oracle(lambda v: pick(model.fc2(torch.tanh(v)).reshape(-1, 2, 3)), a, neurons(a))
    torch.testing.assert_close(got, expected)


def no_hooks(module):
    return not module._forward_hooks and not module._forward_pre_hooks


def test_bad_input_is_rejected_before_ablating_and_hooks_are_removed():
    model, x = make(Deep), x_of(B, 3)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    ablator = LayerFeatureAblation(model, model.fc2)
    with pytest.raises(ValueError, match="layer"):
        LayerFeatureAblation(model, nn.Linear(5, 5))
    with pytest.raises(TypeError, match="layer"):
        LayerFeatureAblation(model, "fc2")
    bad = [
        (ValueError, "layer_mask", dict(layer_mask=torch.zeros(2, 3, dtype=torch.long))),
        (TypeError, "layer_mask", dict(layer_mask=torch.zeros(5))),
        (ValueError, "layer_baselines", dict(layer_baselines=torch.zeros(3))),
        (ValueError, "perturbations_per_eval", dict(perturbations_per_eval=0)),
        (ValueError, "target", dict(target=None)),
        (ValueError, "target", dict(target=3)),
        (ValueError, "target", dict(target=(0, 1))),
        (ValueError, "target", dict(target=[0, 1])),
        (ValueError, "target", dict(target=torch.tensor([0, 1]))),
        (TypeError, "target", dict(target=1.0)),
        (TypeError, "target", dict(target=torch.tensor(1.0))),
    ]
    for error, name, kwargs in bad:
        calls.clear()
        kwargs.setdefault("target", 0)
        with pytest.raises(error, match=name):
            ablator.attribute(x, **kwargs)
        assert len(calls) <= 1, name  # at most the pass that reads the layer
        assert no_hooks(model.fc2)
    tokens = x_of(B, 2, 3)  # fc2 sees the tokens as 2·B rows
    with pytest.raises(ValueError, match="layer: its output has shapes"):
        LayerFeatureAblation(lambda t: model(t.reshape(-1, 3)).reshape(B, -1), model.fc2).attribute(tokens, target=0)


def test_hooks_are_removed_when_the_model_fails():
    model, x = make(Deep), x_of(B, 3)
    runs = []

    def fail_on_third(module, args):
        runs.append(1)
        if len(runs) == 3:
            raise RuntimeError("boom")

    model.fc3.register_forward_pre_hook(fail_on_third)
    for to_input in (False, True):
        runs.clear()
        with pytest.raises(RuntimeError, match="boom"):
            LayerFeatureAblation(model, model.fc2).attribute(x, target=0, attribute_to_layer_input=to_input)
        assert no_hooks(model.fc2)


def test_a_layer_that_runs_twice_or_never_is_rejected():
    model, x = make(Linear2), x_of(B, 3)
    with pytest.raises(ValueError, match="layer: ran 2 times"):
        LayerFeatureAblation(lambda x: model(x) + model(x), model.hidden).attribute(x)
    with pytest.raises(ValueError, match="layer: ran 0 times"):
        LayerFeatureAblation(lambda x: model.fc1(x).sum(1), model.hidden).attribute(x)
