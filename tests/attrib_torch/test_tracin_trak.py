import pytest
import torch
from torch.func import functional_call

from attrib_torch import AttributionTask, TracInAttributor, TRAKAttributor
from kernels import project


def margin_of(problem):
    """TRAK's margin for multi-class classification: logit of the correct class minus logsumexp of the others."""

    def margin(params, data):
        x, y = data
        logits = functional_call(problem.model, params, (x,))
        correct = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.scatter(1, y[:, None], float("-inf"))
        return (correct - torch.logsumexp(others, dim=1)).sum()

    return margin


def correct_probability(problem):
    def p(params, data):
        x, y = data
        return torch.softmax(functional_call(problem.model, params, (x,)), dim=1).gather(1, y[:, None]).squeeze(1)

    return p


def test_tracin_is_the_weighted_sum_of_exact_gradient_products(problem):
    other = {k: v * 0.8 for k, v in problem.state.items()}
    task = AttributionTask(problem.loss_func, problem.model, [problem.state, other])
    attributor = TracInAttributor(task, weight_list=torch.tensor([0.5, 2.0]), normalized_grad=False, show_progress=False)
    scores = attributor.attribute(problem.loader(), problem.loader("test"))
    expected = 0
    for weight, state in zip((0.5, 2.0), (problem.state, other)):
        problem.model.load_state_dict(state)
        problem.params = {k: v.clone() for k, v in state.items()}
        expected = expected + weight * problem.gradients(problem.x_train, problem.y_train) @ \
            problem.gradients(problem.x_test, problem.y_test).T
    problem.model.load_state_dict(problem.state)
    problem.params = {k: v.clone() for k, v in problem.state.items()}
    torch.testing.assert_close(scores, expected, rtol=1e-8, atol=1e-10)
    # self_attribute is the diagonal; topk is the sorted matrix.
    full = attributor.attribute(problem.loader(), problem.loader())
    torch.testing.assert_close(attributor.self_attribute(problem.loader()), torch.diagonal(full))
    top = attributor.topk(problem.loader("test"), 4)
    assert torch.equal(top.indices, torch.sort(scores.T, dim=1, descending=True, stable=True).indices[:, :4])


def test_grad_cos_is_the_cosine_and_projection_is_batch_independent(problem):
    task = AttributionTask(problem.loss_func, problem.model, problem.state)
    cos = TracInAttributor(task, [1.0], normalized_grad=True, show_progress=False)
    G = problem.gradients(problem.x_train, problem.y_train)
    V = problem.gradients(problem.x_test, problem.y_test)
    expected = (G / G.norm(dim=1, keepdim=True)) @ (V / V.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(cos.attribute(problem.loader(), problem.loader("test")), expected)
    kwargs = {"proj_dim": 64, "proj_seed": 3}
    a = TracInAttributor(task, [1.0], False, projector_kwargs=kwargs, show_progress=False)
    b = TracInAttributor(task, [1.0], False, projector_kwargs=kwargs, show_progress=False)
    sa = a.attribute(problem.loader(batch_size=7), problem.loader("test", batch_size=3))
    sb = b.attribute(problem.loader(batch_size=120), problem.loader("test", batch_size=25))
    torch.testing.assert_close(sa, sb, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(sa, project(G, 64, seed=3) @ project(V, 64, seed=3).T, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("own_target", [False, True])
def test_trak_equals_its_closed_form(problem, own_target):
    """Training features from loss_func (the margin), test features from target_func (dattri's convention)."""
    margin = margin_of(problem)
    target = problem.loss_func if own_target else margin
    task = AttributionTask(margin, problem.model, problem.state, target_func=target if own_target else None)
    P = sum(v.numel() for v in problem.state.values())
    attributor = TRAKAttributor(task, correct_probability(problem), projector_kwargs={"proj_dim": P},
                                regularization=0.1, show_progress=False)
    attributor.cache(problem.loader())
    scores = attributor.attribute(problem.loader("test"))

    def features(func, x, y):
        rows = []
        for i in range(len(y)):
            g = torch.func.grad(func)(problem.params, (x[i : i + 1], y[i : i + 1]))
            rows.append(torch.cat([g["weight"].reshape(-1), g["bias"]]))
        return torch.stack(rows)

    # Dense closed form: Φ (ΦᵀΦ + λI)⁻¹ Φ_testᵀ, rows scaled by 1 - p.
    phi = features(margin, problem.x_train, problem.y_train)
    phi_test = features(target, problem.x_test, problem.y_test)
    q = 1 - correct_probability(problem)(problem.params, (problem.x_train, problem.y_train))
    K = phi.T @ phi + 0.1 * torch.eye(P, dtype=phi.dtype)
    expected = q[:, None] * (phi @ torch.linalg.solve(K, phi_test.T))
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-6)
    top = attributor.topk(problem.loader("test"), 3)
    assert torch.equal(top.indices, torch.sort(expected.T, dim=1, descending=True, stable=True).indices[:, :3])
    phi_self = features(target, problem.x_train, problem.y_train)
    torch.testing.assert_close(attributor.self_attribute().double(),
                               q * (phi @ torch.linalg.solve(K, phi_self.T)).diagonal(), rtol=1e-4, atol=1e-6)


def test_trak_ensemble_averages_kernels_and_q(problem):
    other = {k: v * 0.9 for k, v in problem.state.items()}
    margin, prob = margin_of(problem), correct_probability(problem)
    single = []
    for state in (problem.state, other):
        t = TRAKAttributor(AttributionTask(margin, problem.model, state), prob,
                           projector_kwargs={"proj_dim": 32}, regularization=0.1, show_progress=False)
        t.cache(problem.loader())
        kernel = t.attribute(problem.loader("test")).double() / t._q[0][:, None]
        single.append((kernel, t._q[0]))
    both = TRAKAttributor(AttributionTask(margin, problem.model, [problem.state, other]),
                          prob, projector_kwargs={"proj_dim": 32}, regularization=0.1, show_progress=False)
    both.cache(problem.loader())
    expected = ((single[0][0] + single[1][0]) / 2) * ((single[0][1] + single[1][1]) / 2)[:, None]
    torch.testing.assert_close(both.attribute(problem.loader("test")).double(), expected, rtol=1e-4, atol=1e-6)
    problem.model.load_state_dict(problem.state)


def test_bad_input_before_gradients(problem):
    calls = []

    def counting(params, data):
        calls.append(1)
        return problem.loss_func(params, data)

    task = AttributionTask(counting, problem.model, [problem.state, problem.state])
    with pytest.raises(ValueError, match="weight_list"):
        TracInAttributor(task, [1.0], normalized_grad=False)
    with pytest.raises(ValueError, match="unknown keys"):
        TracInAttributor(task, [1.0, 1.0], False, projector_kwargs={"dim": 4})
    with pytest.raises(ValueError, match="proj_dim"):
        TracInAttributor(task, [1.0, 1.0], False, projector_kwargs={"proj_dim": 0})
    bad = TRAKAttributor(task, lambda params, data: torch.ones(len(data[1])) * 1.5, show_progress=False)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        bad.cache(problem.loader())
    assert not calls


@pytest.mark.parametrize("normalized", [False, True])
def test_tracin_factored_path_is_exact(normalized):
    """Linear layers only, no penalty: factored products, equal to an autograd loop (a mean loss, a sum target)."""
    from tests.helpers import classification_batch, small_mlp

    model = small_mlp(2, (6, 8, 4))
    x, y = classification_batch(5, 30, 6, 4)
    states = [{k: v.clone() for k, v in model.state_dict().items()},
              {k: 0.7 * v.clone() for k, v in model.state_dict().items()}]

    def mean_loss(params, data):
        return torch.nn.functional.cross_entropy(functional_call(model, params, (data[0],)), data[1])

    def sum_target(params, data):
        return torch.nn.functional.cross_entropy(functional_call(model, params, (data[0],)), data[1], reduction="sum")

    task = AttributionTask(mean_loss, model, states, target_func=sum_target)
    attributor = TracInAttributor(task, [0.3, 1.5], normalized_grad=normalized, show_progress=False)
    train = [(x[:12], y[:12]), (x[12:24], y[12:24])]
    test = [(x[24:], y[24:])]
    scores = attributor.attribute(train, test)
    assert attributor._factored  # the factored path was taken

    def loop(state, rows):
        out = []
        for i in rows:
            live = {k: v.clone().requires_grad_(True) for k, v in state.items()}
            g = torch.autograd.grad(mean_loss(live, (x[i : i + 1], y[i : i + 1])), list(live.values()))
            out.append(torch.cat([t.reshape(-1) for t in g]))
        G = torch.stack(out)
        return G / G.norm(dim=1, keepdim=True) if normalized else G

    expected = sum(w * loop(s, range(24)) @ loop(s, range(24, 30)).T for w, s in zip((0.3, 1.5), states))
    torch.testing.assert_close(scores, expected)
    full = attributor.attribute(train, train)
    torch.testing.assert_close(attributor.self_attribute(train), torch.diagonal(full))
    for proponents in (True, False):
        top = attributor.topk(test, 5, proponents=proponents)
        order = torch.sort(expected.T, dim=1, descending=proponents, stable=True)
        torch.testing.assert_close(top.values, order.values[:, :5])


def test_tracin_keeps_per_example_gradients_when_factors_disagree(problem):
    """The digits loss carries an L2 penalty on the parameters: its gradients are not ds ⊗ a."""
    task = AttributionTask(problem.loss_func, problem.model, problem.state)
    attributor = TracInAttributor(task, [1.0], normalized_grad=False, show_progress=False)
    attributor.attribute(problem.loader(), problem.loader("test"))
    assert attributor._factored is False
    projected = TracInAttributor(AttributionTask(lambda p, d: problem.loss_func(p, d), problem.model, problem.state),
                                 [1.0], False, projector_kwargs={"proj_dim": 8}, show_progress=False)
    assert projected._factored is False
