"""Every training-set accumulator: folding all batches equals merging any split of them, and the joined batch.

The oracle for each statistic is the same statistic of one batch holding every
example (the dense Hessian of the joined batch, its Hessian-vector products, the
per-example gradients' squares, K-FAC factors fitted on the joined batch).
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from attrib_core import (
    EKFACLayer,
    accumulate,
    ekfac,
    ekfac_correction,
    full_gnvp,
    full_hessian,
    full_hvp,
    gnvp_sum,
    hessian,
    hessian_sum,
    hvp_sum,
    kfac_accumulator,
    make_gnvp,
    make_hvp,
    per_sample_grad,
    second_moments,
)

DT = torch.float64
N = 12


def problem():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=g, dtype=DT) * 0.7
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(N, 3, generator=g, dtype=DT)
    y = torch.randint(0, 2, (N,), generator=g)
    return model, params, (x, y)


MODEL, PARAMS, DATA = problem()
V = torch.randn(3, sum(p.numel() for p in PARAMS.values()), generator=torch.Generator().manual_seed(1), dtype=DT)


def outputs(params, batch):
    return functional_call(MODEL, params, (batch[0],))


def mean_loss(params, batch):
    return nn.functional.cross_entropy(outputs(params, batch), batch[1])


def sum_loss(params, batch):
    return nn.functional.cross_entropy(outputs(params, batch), batch[1], reduction="sum")


def head_loss(out, batch):
    return nn.functional.cross_entropy(out, batch[1])


_BASES = ekfac(MODEL, mean_loss, PARAMS, [DATA]).layers  # fixed bases for the correction alone

# name -> (accumulator, the same statistic of the joined batch)
ACCUMULATORS_UNDER_TEST = {
    "hessian (mean loss)": (lambda: hessian_sum(mean_loss, PARAMS), lambda: hessian(mean_loss, PARAMS, DATA)),
    "hessian (sum loss)": (lambda: hessian_sum(sum_loss, PARAMS, reduction="sum"),
                           lambda: hessian(sum_loss, PARAMS, DATA)),
    "hvp": (lambda: hvp_sum(mean_loss, PARAMS, V), lambda: make_hvp(mean_loss, PARAMS, DATA)(V)),
    "gnvp": (lambda: gnvp_sum(outputs, head_loss, PARAMS, V), lambda: make_gnvp(outputs, head_loss, PARAMS, DATA)(V)),
    "second moments": (lambda: second_moments(mean_loss, PARAMS),
                       lambda: per_sample_grad(mean_loss)(PARAMS, DATA).pow(2).mean(0)),
    "kfac": (lambda: kfac_accumulator(MODEL, mean_loss, PARAMS),
             lambda: accumulate(kfac_accumulator(MODEL, mean_loss, PARAMS), [DATA])),
    "ekfac correction": (lambda: ekfac_correction(MODEL, mean_loss, PARAMS, _BASES),
                         lambda: accumulate(ekfac_correction(MODEL, mean_loss, PARAMS, _BASES), [DATA])),
}


def flat(result):
    """Every tensor of a result (a tensor, K-FAC factors, EK-FAC layers), flattened and joined."""
    if isinstance(result, torch.Tensor):
        return result.reshape(-1)
    if isinstance(result, EKFACLayer):
        return result.eigenvalues.reshape(-1)
    if hasattr(result, "layers"):  # KFACFactors
        return torch.cat([torch.cat([f.A.reshape(-1), f.S.reshape(-1)]) for f in result.layers])
    return torch.cat([flat(r) for r in result])


def split(sizes):
    """The data cut into consecutive batches of ``sizes`` (the last takes the rest)."""
    out, start = [], 0
    for size in sizes:
        if start >= N:
            break
        out.append((DATA[0][start:start + size], DATA[1][start:start + size]))
        start += size
    if start < N:
        out.append((DATA[0][start:], DATA[1][start:]))
    return out


def fold(accumulator, batches):
    state = accumulator.init()
    for batch in batches:
        state = accumulator.update(state, batch)
    return state


@pytest.mark.parametrize("name", list(ACCUMULATORS_UNDER_TEST))
@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=6), cuts=st.lists(st.booleans(), max_size=6))
def test_fold_equals_merge_of_any_split_and_the_joined_batch(name, sizes, cuts):
    make, joined = ACCUMULATORS_UNDER_TEST[name]
    accumulator = make()
    batches = split(sizes)
    whole = accumulator.finalize(fold(accumulator, batches))
    # cut the batch sequence into parts (a rank's share each), fold each, merge in order and reversed
    parts, current = [], []
    for i, batch in enumerate(batches):
        current.append(batch)
        if i < len(cuts) and cuts[i]:
            parts.append(current)
            current = []
    parts.append(current)
    states = [fold(accumulator, part) for part in parts]
    merged, backwards = accumulator.init(), accumulator.init()
    for state in states:
        merged = accumulator.merge(merged, state)
    for state in reversed(states):
        backwards = accumulator.merge(state, backwards)
    torch.testing.assert_close(flat(accumulator.finalize(merged)), flat(whole), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat(accumulator.finalize(backwards)), flat(whole), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat(whole), flat(joined()), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", list(ACCUMULATORS_UNDER_TEST))
def test_no_batch_is_an_error_not_a_zero(name):
    accumulator = ACCUMULATORS_UNDER_TEST[name][0]()
    with pytest.raises(ValueError, match="batches: no batch was given"):
        accumulator.finalize(accumulator.init())


def test_full_training_loss_operators_equal_the_joined_batch():
    batches = split([5, 4])
    torch.testing.assert_close(full_hvp(mean_loss, PARAMS, batches, damping=0.3)(V),
                               make_hvp(mean_loss, PARAMS, DATA, damping=0.3)(V), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(full_hvp(sum_loss, PARAMS, batches, reduction="sum", mode="rev-fwd")(V[0]),
                               make_hvp(sum_loss, PARAMS, DATA)(V[0]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(full_gnvp(outputs, head_loss, PARAMS, batches)(V),
                               make_gnvp(outputs, head_loss, PARAMS, DATA)(V), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(full_hessian(mean_loss, PARAMS, batches), hessian(mean_loss, PARAMS, DATA),
                               rtol=1e-10, atol=1e-12)


def test_operators_refuse_a_one_pass_iterator_and_a_bad_reduction():
    with pytest.raises(TypeError, match="batches: every product passes over the data again"):
        full_hvp(mean_loss, PARAMS, iter(split([6])))
    with pytest.raises(ValueError, match="reduction: expected 'mean' or 'sum'"):
        hessian_sum(mean_loss, PARAMS, reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        kfac_accumulator(MODEL, mean_loss, PARAMS, reduction="none")
