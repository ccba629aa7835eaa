"""The full training loss of the curvature attributors: a sum over batches, never the training set joined.

For a mean loss and for a sum loss the attributors pass over the loader batch by
batch (in groups whose saved activations stay within a fixed budget; here one
batch each), and score exactly as on one batch holding every example; a loss
that is neither (a summed loss plus a weight penalty) is evaluated on the joined set.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call

import attrib_torch.data
import attrib_torch.inverses
from attrib_torch import (
    AttributionTask,
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorExplicit,
    IFAttributorLiSSA,
)

L2 = 1e-2

# ``scale``: 1 for a mean loss, the number of examples for a sum (its Hessian is that much larger)
ATTRIBUTORS = {
    "explicit": lambda task, scale: IFAttributorExplicit(task, regularization=1e-3 * scale, show_progress=False),
    "cg": lambda task, scale: IFAttributorCG(task, max_iter=400, tol=1e-10, regularization=1e-2 * scale,
                                             show_progress=False),
    "arnoldi": lambda task, scale: IFAttributorArnoldi(task, proj_dim=40, max_iter=80, regularization=1e-3 * scale,
                                                       precompute_data_ratio=0.5, show_progress=False),
    "lissa": lambda task, scale: IFAttributorLiSSA(task, batch_size=30, recursion_depth=60, scaling=200.0 * scale,
                                                   damping=0.01, show_progress=False),
}


def losses(problem):
    def logits(params, x):
        return functional_call(problem.model, params, (x,))

    def penalty(params):
        return L2 / 2 * sum(p.pow(2).sum() for p in params.values())

    return {
        "mean plus penalty": (lambda p, b: nn.functional.cross_entropy(logits(p, b[0]), b[1]) + penalty(p), "mean"),
        "sum": (lambda p, b: nn.functional.cross_entropy(logits(p, b[0]), b[1], reduction="sum"), "sum"),
        "sum plus penalty": (
            lambda p, b: nn.functional.cross_entropy(logits(p, b[0]), b[1], reduction="sum") + penalty(p), None),
    }


@pytest.mark.parametrize("method", list(ATTRIBUTORS))
@pytest.mark.parametrize("kind", ["mean plus penalty", "sum", "sum plus penalty"])
def test_batches_combine_as_the_loss_does(problem, monkeypatch, method, kind):
    loss, reduction = losses(problem)[kind]
    joined_sizes = []
    real_concatenate = attrib_torch.data.concatenate

    def watched(loader, device):
        out = real_concatenate(loader, device)
        joined_sizes.append(len(out[1]))
        return out

    monkeypatch.setattr(attrib_torch.inverses, "concatenate", watched)
    monkeypatch.setattr(attrib_torch.data, "concatenate", watched)
    monkeypatch.setattr(attrib_torch.inverses, "_GROUP_BYTES", 1)  # groups of one loader batch
    task = AttributionTask(loss, problem.model, problem.state)
    test = problem.loader("test")
    scale = 1 if reduction == "mean" else len(problem.y_train)
    one_batch = ATTRIBUTORS[method](task, scale)
    one_batch.cache(problem.loader(batch_size=len(problem.y_train)))
    expected = one_batch.attribute(problem.loader(batch_size=len(problem.y_train)), test)
    joined_sizes.clear()
    batched = ATTRIBUTORS[method](task, scale)
    batched.cache(problem.loader(batch_size=32))
    scores = batched.attribute(problem.loader(batch_size=32), test)
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-9 * float(expected.abs().max()))
    if reduction is None:  # only the joined training set gives this loss exactly
        assert len(problem.y_train) in joined_sizes
    else:  # the first two batches are joined once, to read the reduction off the loss
        assert max(joined_sizes, default=0) <= 64, joined_sizes
        assert attrib_torch.inverses._reduction(
            loss, problem.params, *list(attrib_torch.data.batches(problem.loader(), torch.device("cpu")))[:2],
            torch.device("cpu")) == reduction
