"""Results that must be right or refused: solver warnings, stale caches, vmap's fallback, random models.

Oracles: a fresh attributor on the changed data, the loop of per-example gradients.
"""

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from attrib_torch import AttributionTask, IFAttributorCG, IFAttributorExplicit, TracInAttributor


def test_cg_that_does_not_converge_warns_once_per_call_with_counts(problem, monkeypatch):
    monkeypatch.setattr("attrib_torch.base._GROUP_MAX_ROWS", 13)  # one solve per test batch of 13
    task = AttributionTask(problem.loss_func, problem.model, problem.state)
    attributor = IFAttributorCG(task, max_iter=1, show_progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attributor.attribute(problem.loader(), problem.loader("test", batch_size=13))
    mine = [w for w in caught if str(w.message).startswith("CG (")]
    # attributed to the caller's line, not to a frame inside the library
    assert {w.filename for w in mine} == {__file__}
    messages = [str(w.message) for w in mine]
    # 25 test examples in two solves (13 and 12): one warning for the call, counting both
    assert len(messages) == 1, messages
    assert "of 25 right-hand sides solved, 25 of 25 reached the step cap" in messages[0]
    assert "largest residual_norm" in messages[0] and "max_iter (now 1)" in messages[0]
    converged = IFAttributorCG(task, max_iter=500, tol=1e-9, show_progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged: nothing to say
        converged.attribute(problem.loader(), problem.loader("test"))


@pytest.mark.parametrize("cls", ["explicit", "tracin"])
def test_data_changed_in_place_is_featurised_again(problem, cls):
    def build():
        task = AttributionTask(problem.loss_func, problem.model, problem.state)
        if cls == "explicit":
            return IFAttributorExplicit(task, regularization=1e-3, show_progress=False)
        return TracInAttributor(task, [1.0], normalized_grad=False, show_progress=False)

    x, y = problem.x_train.clone(), problem.y_train.clone()
    train = DataLoader(TensorDataset(x, y), batch_size=32)
    attributor = build()
    attributor.cache(train)
    before = attributor.attribute(train, problem.loader("test"))
    x[:10] += 0.5  # the user edits the data in place
    y[10:20] = (y[10:20] + 1) % 10
    after = attributor.attribute(train, problem.loader("test"))
    fresh = build()
    fresh.cache(train)
    torch.testing.assert_close(after, fresh.attribute(train, problem.loader("test")))
    assert not torch.allclose(before, after)
    attributor.clear_cache()
    assert attributor.full_train_dataloader is None and not attributor._train_reps


def test_vmap_falls_back_only_when_it_cannot_trace(problem):
    task = AttributionTask(problem.loss_func, problem.model, problem.state)
    attributor = TracInAttributor(task, [1.0], normalized_grad=False, show_progress=False)
    wrong_width = [(torch.randn(4, 63, dtype=torch.float64), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):  # the user's error, raised
        attributor.self_attribute(wrong_width)
    assert attributor._gradients.vmap_failed is False

    def with_item(params, data):  # .item() cannot be traced by vmap; the loop can run it
        scale = float(data[0].abs().max().item() > -1)
        return scale * problem.loss_func(params, data)

    looped = TracInAttributor(AttributionTask(with_item, problem.model, problem.state), [1.0], False,
                              show_progress=False)
    with pytest.warns(UserWarning, match="vmap cannot trace"):
        scores = looped.self_attribute(problem.loader())
    assert looped._gradients.vmap_failed is True
    torch.testing.assert_close(scores, attributor.self_attribute(problem.loader()))


def test_task_gradients_of_a_dropout_model_in_train_mode():
    """dattri's behaviour: the model in eval mode for the call (its loading does that), vmap allowing randomness."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)).double().train()

    def loss(params, data):
        return nn.functional.cross_entropy(functional_call(model, params, (data[0],)), data[1])

    task = AttributionTask(loss, model, model.state_dict())
    grad = task.get_grad_loss_func()
    flat, _ = task.get_param()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1, 0])
    g = grad(flat, (x, y))
    assert g.shape == (6, flat.numel()) and bool(torch.isfinite(g).all())
    torch.testing.assert_close(grad(flat, (x, y)), g)  # eval mode during the call, as dattri: deterministic
    assert model.training and model[1].training  # and the model's own mode afterwards
    eval_model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)).double()
    eval_model.load_state_dict(model.state_dict())
    expected = torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(
        nn.functional.cross_entropy(eval_model.eval()(x[i : i + 1]), y[i : i + 1]), list(eval_model.parameters()))])
        for i in range(6)])
    torch.testing.assert_close(g, expected)


def test_a_loss_that_adds_its_own_batch_dimension_is_explained(problem):
    """dattri's TRAK examples unsqueeze each example; here it arrives as a batch of one: say what to remove."""
    from attrib_torch import TRAKAttributor

    def dattri_style(params, data):
        x, y = data
        logits = functional_call(problem.model, params, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, y.unsqueeze(0))

    def dattri_probability(params, data):
        x, y = data
        logits = functional_call(problem.model, params, (x.unsqueeze(0),))
        return torch.softmax(logits, -1)[0, y]

    task = AttributionTask(dattri_style, problem.model, problem.state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "vmap cannot trace" warning on the way
        with pytest.raises(ValueError, match=r"loss_func: .*remove the unsqueeze\(0\) calls"):
            TracInAttributor(task, [1.0], False, show_progress=False).self_attribute(problem.loader())
        trak = TRAKAttributor(task, dattri_probability, show_progress=False)
        with pytest.raises(ValueError, match=r"correct_probability_func: .*remove the unsqueeze\(0\)"):
            trak.cache(problem.loader())
        with pytest.raises(ValueError, match=r"loss_func: .*remove the unsqueeze\(0\)"):
            IFAttributorCG(task, show_progress=False).cache(problem.loader())  # before any Hessian work

    def dattri_module_loss(params, data):  # nn.CrossEntropyLoss fails by an AssertionError under vmap
        x, y = data
        return nn.CrossEntropyLoss()(functional_call(problem.model, params, (x.unsqueeze(0),)), y.unsqueeze(0))

    module_task = AttributionTask(dattri_module_loss, problem.model, problem.state)
    with pytest.raises(ValueError, match=r"loss_func: .*remove the unsqueeze\(0\)"):
        TracInAttributor(module_task, [1.0], False, show_progress=False).self_attribute(problem.loader())


def test_every_solver_front_end_reports_non_convergence(problem):
    """CG and LiSSA, in the task-based attributors and the legacy IFAttributor: a warning with counts per solve."""
    from attrib_torch import IFAttributor, IFAttributorLiSSA

    task = AttributionTask(problem.loss_func, problem.model, problem.state)

    def legacy_loss(params, loader):
        return sum(problem.loss_func(params, batch) * len(batch[1]) for batch in loader) / \
            sum(len(batch[1]) for batch in loader)

    cases = [
        (lambda: IFAttributorLiSSA(task, recursion_depth=30, scaling=0.05, show_progress=False), "LiSSA (", "diverged"),
        (lambda: IFAttributor(legacy_loss, problem.params, "cg", {"max_iter": 1}), "CG (", "reached the step cap"),
        (lambda: IFAttributor(legacy_loss, problem.params, "lissa", {"recursion_depth": 30, "scaling": 0.05}),
         "LiSSA (", "diverged"),
    ]
    for make, solver, text in cases:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make().attribute(problem.loader(), problem.loader("test"))
        messages = [str(w.message) for w in caught if str(w.message).startswith(solver)]
        assert len(messages) == 1, (solver, [str(w.message) for w in caught])
        assert f"of 25 right-hand sides solved, 25 of 25 {text}" in messages[0], messages


def test_frozen_models_joined_batches_and_unsized_loaders(problem):
    from torch.utils.data import DistributedSampler, IterableDataset

    from attrib_torch import IFAttributorDataInf
    from attrib_torch.data import check_loader, concatenate, take

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model.requires_grad_(False)  # an evaluation setup: naming a layer still works
    task = AttributionTask(lambda p, d: nn.functional.cross_entropy(functional_call(model, p, (d[0],)), d[1]),
                           model, model.state_dict())
    assert TracInAttributor(task, [1.0], False, layer_name="2", show_progress=False).names == ["2.weight", "2.bias"]
    with pytest.raises(ValueError, match="freezes all of them"):
        TracInAttributor(task, [1.0], False, show_progress=False)

    joined = concatenate([{"x": torch.zeros(2, 1), "ids": ["a", "b"], "tag": "t"},
                          {"x": torch.ones(3, 1), "ids": ["c", "d", "e"], "tag": "t"}], torch.device("cpu"))
    assert joined["ids"] == ["a", "b", "c", "d", "e"] and joined["tag"] == "t" and joined["x"].shape == (5, 1)
    assert take(joined, torch.tensor([4, 0]))["ids"] == ["e", "a"] and take(joined, 1)["ids"] == "b"
    with pytest.raises(ValueError, match="cannot be joined"):
        concatenate([(torch.zeros(2), "a"), (torch.zeros(2), "b")], torch.device("cpu"))

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(zip(problem.x_train, problem.y_train))

    stream = DataLoader(Stream(), batch_size=30)
    ratio = IFAttributorDataInf(AttributionTask(problem.loss_func, problem.model, problem.state),
                                fim_estimate_data_ratio=0.5, show_progress=False)
    ratio.cache(stream)
    assert ratio._train_layers[0][0].shape[0] == 60  # the first 2 of 4 batches
    shuffled = DataLoader(TensorDataset(problem.x_train), sampler=DistributedSampler(
        TensorDataset(problem.x_train), num_replicas=1, rank=0, shuffle=True), batch_size=8)
    with pytest.raises(ValueError, match="fixed order"):
        check_loader(shuffled, "train_dataloader")


def test_a_layer_run_twice_takes_the_loop_with_the_reason():
    torch.manual_seed(0)
    layer = nn.Linear(3, 3).double()

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(torch.tanh(self.layer(x)))

    model = Twice().eval()

    def loss(params, batch):
        return functional_call(model, params, (batch[0],)).pow(2).sum(1).mean()

    def per_example(params, batch):
        return functional_call(model, params, (batch[0],)).pow(2).sum(1)

    def untraceable(params, batch):  # .item() keeps vmap out
        return loss(params, batch) * float(batch[0].abs().max().item() > -1)

    untraceable.per_example = per_example
    x = torch.randn(4, 3, dtype=torch.float64)
    loader = [(x,)]
    plain = TracInAttributor(AttributionTask(loss, model, model.state_dict()), [1.0], False, show_progress=False)
    hooked = TracInAttributor(AttributionTask(untraceable, model, model.state_dict()), [1.0], False, show_progress=False)
    with pytest.warns(UserWarning, match="runs more than once"):
        scores = hooked.self_attribute(loader)
    torch.testing.assert_close(scores, plain.self_attribute(loader))
