"""Layer ablation against closed forms and a plain one-group-at-a-time loop."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attrib_core.ablation import ablate, layer_ablation, prepare_ablation

DT = torch.float64


def loop_oracle(f, value, groups, baseline):
    """Set one group of ``value`` (``groups`` has its shape) to ``baseline`` at a time and rerun ``f``: no batching."""
    expected = torch.zeros_like(value)
    for g in torch.unique(groups).tolist():
        chosen = groups == g
        drop = f(value) - f(torch.where(chosen, baseline, value))
        expected = torch.where(chosen, drop.reshape(-1, *[1] * (value.dim() - 1)), expected)
    return expected


def nonlinear(weight):
    """``v -> (B,)``, not additive over neurons, so ablating two neurons together differs from one at a time."""

    def f(v):
        rows = len(v)
        return torch.tanh((v * weight).reshape(rows, -1)).sum(1) * (v.reshape(rows, -1).sum(1) + 1)

    return f


def test_linear_output_drops_by_weight_times_value_minus_baseline():
    g = torch.Generator().manual_seed(0)
    value = torch.randn(4, 3, 2, generator=g, dtype=DT)
    w = torch.randn(3, 2, generator=g, dtype=DT)
    baseline = torch.randn(3, 2, generator=g, dtype=DT)

    def f(v):
        return (v * w).sum((1, 2)) + 0.5

    torch.testing.assert_close(layer_ablation(f, value), w * value)
    torch.testing.assert_close(layer_ablation(f, value, baseline=1.5), w * (value - 1.5))
    torch.testing.assert_close(layer_ablation(f, value, baseline=baseline), w * (value - baseline))
    rows = torch.tensor([[0], [1], [1]])  # (3, 1): row 0 of value[b] is one group, rows 1 and 2 another
    grouped = layer_ablation(f, value, mask=rows)
    drops = w * value
    torch.testing.assert_close(grouped[:, 0], drops[:, 0].sum(1, keepdim=True).expand(4, 2))
    torch.testing.assert_close(grouped[:, 1:], drops[:, 1:].sum((1, 2)).reshape(4, 1, 1).expand(4, 2, 2))
    everything = layer_ablation(f, value, mask=torch.tensor(7))  # a 0-d mask: one group
    torch.testing.assert_close(everything, drops.sum((1, 2)).reshape(4, 1, 1).expand(4, 3, 2))


@given(
    batch=st.integers(1, 4),
    shape=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    n_groups=st.one_of(st.none(), st.integers(1, 6)),
    per_example=st.booleans(),
    baseline_kind=st.sampled_from(["none", "scalar", "tensor"]),
    per_eval=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
def test_matches_the_plain_loop(batch, shape, n_groups, per_example, baseline_kind, per_eval, seed):
    """``n_groups=None``: no mask, a group per neuron; else random ids in ``[-2, n_groups - 2)``."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    value = torch.randn((batch, *shape), generator=g, dtype=DT)
    f = nonlinear(torch.randn(shape, generator=g, dtype=DT))
    if n_groups is None:
        mask, groups = None, torch.arange(value[0].numel()).reshape(shape).expand(value.shape)
    else:
        mask = torch.randint(0, n_groups, (batch if per_example else 1, *shape), generator=g) - 2
        groups = mask.expand(value.shape)
    baseline = {"none": 0.0, "scalar": 0.7, "tensor": torch.randn(shape, generator=g, dtype=DT)}[baseline_kind]
    got = layer_ablation(f, value, mask=mask, baseline=baseline, perturbations_per_eval=per_eval)
    torch.testing.assert_close(got, loop_oracle(f, value, groups, torch.as_tensor(baseline, dtype=DT)))


@pytest.mark.parametrize("per_eval", [1, 2, 3, 7])
def test_batching_groups_changes_the_calls_not_the_result(per_eval):
    g = torch.Generator().manual_seed(1)
    value = torch.randn(3, 5, generator=g, dtype=DT)
    f = nonlinear(torch.randn(5, generator=g, dtype=DT))
    rows = []

    def counted(v):
        rows.append(v.shape[0])
        return f(v)

    mask = torch.tensor([0, 1, 1, 2, 3])  # 4 groups
    got = layer_ablation(counted, value, mask=mask, perturbations_per_eval=per_eval)
    expected = layer_ablation(f, value, mask=mask)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    full, last = divmod(4, per_eval)
    assert rows == [3] + [3 * per_eval] * full + ([3 * last] if last else [])


def test_tuple_layer_ablates_each_tensor_separately_and_keeps_the_structure():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 4, generator=g, dtype=DT), torch.randn(3, 2, 2, generator=g, dtype=DT)
    wa, wb = torch.randn(4, generator=g, dtype=DT), torch.randn(2, 2, generator=g, dtype=DT)
    seen = []

    def f(value):
        seen.append(type(value))
        x, y = value
        return x @ wa + (y * wb).sum((1, 2)) + (x.sum(1) * y.sum((1, 2)))

    got = layer_ablation(f, (a, b), baseline=(0.0, 1.0), perturbations_per_eval=3)
    assert isinstance(got, tuple) and set(seen) == {tuple}
    torch.testing.assert_close(got[0], loop_oracle(lambda x: f((x, b)), a, torch.arange(4).expand(3, 4), 0.0))
    groups_b = torch.arange(4).reshape(2, 2).expand(3, 2, 2)
    torch.testing.assert_close(got[1], loop_oracle(lambda y: f((a, y)), b, groups_b, torch.tensor(1.0, dtype=DT)))


def test_forward_may_modify_its_argument_in_place():
    value = torch.arange(6, dtype=DT).reshape(2, 3) - 2

    def f(v):
        out = v.sum(1)
        v.relu_()
        return out

    torch.testing.assert_close(layer_ablation(f, value, perturbations_per_eval=2), value)


def test_accumulates_in_float32_at_least():
    value = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).half()
    got = layer_ablation(lambda v: v.sum(1), value)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, value.float(), rtol=0, atol=0)


def test_bad_input_is_rejected_before_any_forward():
    value = torch.randn(2, 3, dtype=DT)
    calls = []

    def f(v):
        calls.append(1)
        return v.sum(1)

    with pytest.raises(TypeError, match="mask"):
        layer_ablation(f, value, mask=torch.zeros(3))
    with pytest.raises(TypeError, match="mask"):
        layer_ablation(f, value, mask=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        layer_ablation(f, value, mask=torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="baseline"):
        layer_ablation(f, value, baseline=torch.zeros(4))
    with pytest.raises(TypeError, match="baseline"):
        layer_ablation(f, value, baseline="zero")
    with pytest.raises(ValueError, match="perturbations_per_eval"):
        layer_ablation(f, value, perturbations_per_eval=0)
    with pytest.raises(TypeError, match="perturbations_per_eval"):
        layer_ablation(f, value, perturbations_per_eval=1.5)
    with pytest.raises(ValueError, match="layer_value"):
        layer_ablation(f, (value, torch.randn(3, 3)))
    with pytest.raises(TypeError, match="layer_value"):
        layer_ablation(f, [value])
    with pytest.raises(ValueError, match=r"mask: got 1 entries"):
        layer_ablation(f, (value, value), mask=(None,))
    with pytest.raises(ValueError, match=r"baseline\[1\]"):
        layer_ablation(f, (value, value), baseline=(0.0, torch.zeros(5)))
    with pytest.raises(ValueError, match="my_mask"):
        prepare_ablation(value, mask=torch.zeros(5, dtype=torch.long), mask_name="my_mask")
    assert not calls
    with pytest.raises(ValueError, match="forward_with_layer"):
        layer_ablation(lambda v: v, value)
    with pytest.raises(ValueError, match="forward_with_layer"):
        ablate(lambda v: v.sum(), prepare_ablation(value))
