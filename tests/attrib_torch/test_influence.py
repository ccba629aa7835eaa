import warnings

import pytest
import torch

from attrib_torch import (
    AttributionTask,
    IFAttributor,
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorDataInf,
    IFAttributorEKFAC,
    IFAttributorExplicit,
    IFAttributorLiSSA,
)


def task_of(problem, checkpoints=None):
    return AttributionTask(problem.loss_func, problem.model, checkpoints or problem.state)


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def test_explicit_equals_the_dense_formula(problem):
    attributor = IFAttributorExplicit(task_of(problem), show_progress=False)
    attributor.cache(problem.loader())
    scores = attributor.attribute(problem.loader(), problem.loader("test"))
    assert scores.shape == (120, 25)
    torch.testing.assert_close(scores, problem.dense_influence(), rtol=1e-7, atol=1e-9)


def test_results_do_not_depend_on_batch_sizes(problem):
    attributor = IFAttributorExplicit(task_of(problem), show_progress=False)
    attributor.cache(problem.loader(batch_size=120))
    a = attributor.attribute(problem.loader(batch_size=120), problem.loader("test", batch_size=25))
    other = IFAttributorExplicit(task_of(problem), show_progress=False)
    other.cache(problem.loader(batch_size=17))
    b = other.attribute(problem.loader(batch_size=17), problem.loader("test", batch_size=4))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("make,tolerance", [
    (lambda t: IFAttributorCG(t, max_iter=200, tol=1e-12, show_progress=False), 1e-6),
    (lambda t: IFAttributorArnoldi(t, proj_dim=650, max_iter=650, show_progress=False), 1e-5),
    (lambda t: IFAttributorLiSSA(t, batch_size=120, recursion_depth=2000, scaling=1.0, show_progress=False), 1e-6),
])
def test_iterative_solvers_agree_with_explicit(problem, make, tolerance):
    attributor = make(task_of(problem))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divergence, no dropped eigenpairs
        # Softmax regression's Hessian has repeated eigenvalues (pixels that are always 0, the
        # sum over classes), so its Krylov space has 505 dimensions, not 650; the gradients lie
        # in it, so the influence is still exact.
        warnings.filterwarnings("ignore", message="arnoldi: the Krylov space became invariant")
        attributor.cache(problem.loader())
        scores = attributor.attribute(problem.loader(), problem.loader("test"))
    assert relative_error(scores, problem.dense_influence()) < tolerance


def test_datainf_equals_its_formula(problem):
    attributor = IFAttributorDataInf(task_of(problem), show_progress=False)
    scores = attributor.attribute(problem.loader(), problem.loader("test"))
    G = problem.gradients(problem.x_train, problem.y_train)  # weight then bias: one layer
    V = problem.gradients(problem.x_test, problem.y_test)
    lam = 0.1 * G.pow(2).sum(1).mean() / G.shape[1]
    n = G.shape[0]
    inverse_v = torch.stack([
        sum((v - (G[i] @ v) / (lam + G[i] @ G[i]) * G[i]) for i in range(n)) / (n * lam) for v in V
    ])
    torch.testing.assert_close(scores, G @ inverse_v.T, rtol=1e-8, atol=1e-10)


def data_loss(problem):
    """The data term alone: EK-FAC approximates its Fisher, with damping in place of the L2 term."""
    return lambda params, data: torch.nn.functional.cross_entropy(
        torch.func.functional_call(problem.model, params, (data[0],)), data[1])


def flat_grad(problem, f, x, y):
    g = torch.func.grad(lambda p: f(p, (x, y)))(problem.params)
    return torch.cat([g["weight"].reshape(-1), g["bias"]])


def test_ekfac_exact_for_one_training_example(problem):
    f = data_loss(problem)
    task = AttributionTask(f, problem.model, problem.state)
    train = [(problem.x_train[:1], problem.y_train[:1])]
    scores = IFAttributorEKFAC(task, damping=1e-3, show_progress=False).attribute(train, problem.loader("test"))
    # One example: the empirical Fisher is g gᵀ, and EK-FAC is exact.
    g = flat_grad(problem, f, problem.x_train[:1], problem.y_train[:1]).unsqueeze(0)
    V = torch.stack([flat_grad(problem, f, problem.x_test[i : i + 1], problem.y_test[i : i + 1]) for i in range(25)])
    F = g.T @ g + 1e-3 * torch.eye(g.shape[1], dtype=g.dtype)
    torch.testing.assert_close(scores, g @ torch.linalg.solve(F, V.T), rtol=1e-6, atol=1e-9)


# Measured: 0.93 (sampled: one label draw per example) and 0.87 (empirical).
@pytest.mark.parametrize("fisher,threshold", [("sampled", 0.9), ("empirical", 0.8)])
def test_ekfac_tracks_explicit_on_the_digits(problem, fisher, threshold):
    # For softmax regression the Hessian of the data term is the (sampled-label) Fisher.
    task = AttributionTask(data_loss(problem), problem.model, problem.state)
    approx = IFAttributorEKFAC(task, damping=1e-2, fisher=fisher, show_progress=False)
    explicit = IFAttributorExplicit(task, regularization=1e-2, show_progress=False)
    a = approx.attribute(problem.loader(), problem.loader("test"))
    b = explicit.attribute(problem.loader(), problem.loader("test"))
    corr = float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])
    assert corr > threshold, corr


def test_ekfac_heuristic_damping_is_a_tenth_of_each_layers_mean_eigenvalue(problem):
    task = AttributionTask(data_loss(problem), problem.model, problem.state)
    heuristic = IFAttributorEKFAC(task, damping="heuristic", show_progress=False)
    scores = heuristic.attribute(problem.loader(), problem.loader("test"))
    fit = heuristic._fits[0]
    (layer,) = fit.layers
    damping = 0.1 * float(layer.eigenvalues.mean())
    fixed = IFAttributorEKFAC(task, damping=damping, show_progress=False)
    torch.testing.assert_close(scores, fixed.attribute(problem.loader(), problem.loader("test")))
    with pytest.raises(ValueError, match="'heuristic'"):
        IFAttributorEKFAC(task, damping="kronfluence")


def test_self_attribute_is_the_diagonal_and_topk_is_the_sorted_matrix(problem):
    attributor = IFAttributorExplicit(task_of(problem), show_progress=False)
    attributor.cache(problem.loader())
    full = attributor.attribute(problem.loader(), problem.loader())
    torch.testing.assert_close(attributor.self_attribute(problem.loader()), torch.diagonal(full))
    scores = attributor.attribute(problem.loader(), problem.loader("test"))
    for proponents in (True, False):
        top = attributor.topk(problem.loader("test"), 5, proponents=proponents)
        order = torch.sort(scores.T, dim=1, descending=proponents, stable=True)
        assert torch.equal(top.indices, order.indices[:, :5])
        torch.testing.assert_close(top.values, order.values[:, :5])


def test_checkpoints_as_paths_or_state_dicts_and_ensembles_average(problem, tmp_path):
    other = {k: v * 0.9 for k, v in problem.state.items()}
    paths = []
    for i, state in enumerate([problem.state, other]):
        paths.append(tmp_path / f"ckpt{i}.pt")
        torch.save(state, paths[-1])
    by_path = IFAttributorExplicit(AttributionTask(problem.loss_func, problem.model, [str(p) for p in paths]),
                                   regularization=0.1, show_progress=False)
    by_dict = IFAttributorExplicit(AttributionTask(problem.loss_func, problem.model, [problem.state, other]),
                                   regularization=0.1, show_progress=False)
    a = by_path.attribute(problem.loader(), problem.loader("test"))
    b = by_dict.attribute(problem.loader(), problem.loader("test"))
    torch.testing.assert_close(a, b)
    singles = [
        IFAttributorExplicit(AttributionTask(problem.loss_func, problem.model, state), regularization=0.1,
                             show_progress=False).attribute(problem.loader(), problem.loader("test"))
        for state in (problem.state, other)
    ]
    torch.testing.assert_close(a, (singles[0] + singles[1]) / 2)
    problem.model.load_state_dict(problem.state)


def loader_loss(problem):
    """The legacy entry point's ``target_func(params, loader)``: the example-weighted mean loss over a loader."""

    def target(params, loader):
        total, count = 0.0, 0
        for x, y in loader:
            total = total + problem.loss_func(params, (x, y)) * len(y)
            count += len(y)
        return total / count

    return target


def test_legacy_entry_point_equals_explicit(problem):
    target = loader_loss(problem)

    legacy = IFAttributor(target, problem.params, ihvp_solver="explicit")
    legacy.cache(problem.loader())
    scores = legacy.attribute(problem.loader(), problem.loader("test"))
    torch.testing.assert_close(scores, problem.dense_influence(), rtol=1e-7, atol=1e-9)
    cg = IFAttributor(target, problem.params, ihvp_solver="cg", ihvp_kwargs={"max_iter": 300, "tol": 1e-12})
    assert relative_error(cg.attribute(problem.loader(), problem.loader("test")), problem.dense_influence()) < 1e-6
    with pytest.raises(ValueError, match="ihvp_kwargs"):
        IFAttributor(target, problem.params, ihvp_solver="cg", ihvp_kwargs={"depth": 3})


@pytest.mark.parametrize("solver,kwargs", [
    ("explicit", {"regularization": 1e-3}),
    ("cg", {"max_iter": 200, "tol": 1e-10, "regularization": 1e-2}),
    ("arnoldi", {"proj_dim": 20, "max_iter": 40, "regularization": 1e-3, "precompute_data_ratio": 0.5}),
    ("lissa", {"batch_size": 20, "recursion_depth": 40, "scaling": 20.0, "damping": 0.01, "seed": 3}),
])
def test_legacy_entry_point_is_the_task_based_class_with_the_same_settings(problem, solver, kwargs):
    """Same settings (names, defaults, checks), same fit, same numbers: one code path behind both front ends."""
    from attrib_torch import IFAttributorArnoldi, IFAttributorLiSSA

    target = loader_loss(problem)

    classes = {"explicit": IFAttributorExplicit, "cg": IFAttributorCG, "arnoldi": IFAttributorArnoldi,
               "lissa": IFAttributorLiSSA}
    task = AttributionTask(problem.loss_func, problem.model, problem.state)
    modern = classes[solver](task, show_progress=False, **kwargs)
    legacy = IFAttributor(target, problem.params, ihvp_solver=solver, ihvp_kwargs=kwargs)
    assert legacy.inverse == modern.inverse
    name, value = next(iter(kwargs.items()))
    assert getattr(modern, name) == value  # dattri's attributes, read from the one settings object
    with pytest.raises(AttributeError, match="fixed at construction"):
        setattr(modern, name, value)  # what was fitted depends on it: never silently ignored
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the short LiSSA and CG runs say they stopped at their caps
        modern.cache(problem.loader())
        expected = modern.attribute(problem.loader(), problem.loader("test"))
        scores = legacy.attribute(problem.loader(), problem.loader("test"))
    if solver == "arnoldi":  # legacy applies the inverse on the kept pairs, the class projects both sides
        expected = expected * modern.norm_constant
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-9 * float(expected.abs().max()))
    with pytest.raises(TypeError, match="max_iter"):  # one error type per mistake, whichever front end
        IFAttributor(target, problem.params, ihvp_solver="cg", ihvp_kwargs={"max_iter": 2.5})
    with pytest.raises(TypeError, match="max_iter"):
        IFAttributorCG(task, max_iter=2.5)


def test_bad_input_before_any_gradient(problem):
    calls = []

    def counting(params, data):
        calls.append(1)
        return problem.loss_func(params, data)

    task = AttributionTask(counting, problem.model, problem.state)
    calls.clear()
    with pytest.raises(ValueError, match="layer_name|names"):
        IFAttributorExplicit(task, layer_name="decoder")
    shuffled = torch.utils.data.DataLoader(problem.loader().dataset, batch_size=8, shuffle=True)
    with pytest.raises(ValueError, match="RandomSampler"):
        IFAttributorExplicit(task).attribute(shuffled, problem.loader("test"))
    with pytest.raises(ValueError, match="does not exist"):
        AttributionTask(counting, problem.model, "/no/such/checkpoint.pt")
    with pytest.raises(ValueError, match="max_iter"):
        IFAttributorArnoldi(task, proj_dim=50, max_iter=10)
    with pytest.raises(ValueError, match="fisher"):
        IFAttributorEKFAC(task, fisher="true")
    assert not calls


@pytest.mark.parametrize("make", [
    lambda t: IFAttributorExplicit(t, show_progress=False),
    lambda t: IFAttributorCG(t, max_iter=300, tol=1e-12, show_progress=False),
])
def test_relatif_divides_by_the_closed_form(problem, make):
    """RelatIF (dattri's relatif_method): rows over sqrt(g_iᵀ H⁻¹ g_i) ("l") or ‖H⁻¹ g_i‖ ("theta")."""
    f, theta = problem.flat_objective((problem.x_train, problem.y_train))
    H = torch.autograd.functional.hessian(f, theta)
    G = problem.gradients(problem.x_train, problem.y_train)
    solved = torch.linalg.solve(H, G.T).T  # H⁻¹ g_i, row by row
    dense = problem.dense_influence()
    attributor = make(task_of(problem))
    attributor.cache(problem.loader())
    plain = attributor.attribute(problem.loader(), problem.loader("test"))
    torch.testing.assert_close(plain, dense, rtol=1e-6, atol=1e-8)
    l_scores = attributor.attribute(problem.loader(), problem.loader("test"), relatif_method="l")
    torch.testing.assert_close(l_scores, dense / (G * solved).sum(1, keepdim=True).sqrt(), rtol=1e-6, atol=1e-8)
    theta_scores = attributor.attribute(problem.loader(), problem.loader("test"), relatif_method="theta")
    torch.testing.assert_close(theta_scores, dense / solved.norm(dim=1, keepdim=True), rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="relatif_method"):
        attributor.attribute(problem.loader(), problem.loader("test"), relatif_method="L")


def test_relatif_l_refuses_a_negative_self_influence():
    from torch import nn
    from torch.func import functional_call

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()  # untrained: indefinite

    def loss(params, data):
        return nn.functional.cross_entropy(functional_call(model, params, (data[0],)), data[1])

    x, y = torch.randn(40, 3, dtype=torch.float64), torch.randint(0, 2, (40,))
    attributor = IFAttributorExplicit(AttributionTask(loss, model, model.state_dict()), show_progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # not positive definite: reported by its own warning
        attributor.cache([(x, y)])
        with pytest.raises(ValueError, match="no real square root"):
            attributor.attribute([(x, y)], [(x[:3], y[:3])], relatif_method="l")


def test_dattri_arguments(problem):
    """DataInf's fim_estimate_data_ratio, EK-FAC's cache(max_iter), Arnoldi refusing attribute before cache."""
    ratio = IFAttributorDataInf(task_of(problem), fim_estimate_data_ratio=0.5, show_progress=False)
    ratio.cache(problem.loader(batch_size=30))  # 4 batches: the first 2 estimate the Fisher
    half = IFAttributorDataInf(task_of(problem), show_progress=False)
    half.cache(problem.loader(batch_size=30))
    half._train_layers[0] = [t[:60] for t in half._train_layers[0]]
    test_rep = problem.gradients(problem.x_test, problem.y_test)
    torch.testing.assert_close(ratio.transform_test_rep(0, test_rep), half.transform_test_rep(0, test_rep))
    with pytest.raises(ValueError, match="fim_estimate_data_ratio"):
        IFAttributorDataInf(task_of(problem), fim_estimate_data_ratio=1.5)
    f = data_loss(problem)
    first = IFAttributorEKFAC(AttributionTask(f, problem.model, problem.state), damping=1e-3, show_progress=False)
    first.cache(problem.loader(batch_size=40), max_iter=1)
    only = IFAttributorEKFAC(AttributionTask(f, problem.model, problem.state), damping=1e-3, show_progress=False)
    only.cache([(problem.x_train[:40], problem.y_train[:40])])
    torch.testing.assert_close(first.transform_test_rep(0, test_rep), only.transform_test_rep(0, test_rep))
    arnoldi = IFAttributorArnoldi(task_of(problem), proj_dim=5, max_iter=10, show_progress=False)
    with pytest.raises(ValueError, match="call cache"):
        arnoldi.attribute(problem.loader(), problem.loader("test"))


def test_arnoldi_builds_its_basis_in_the_models_precision_and_again_in_float64_when_it_loses_orthogonality(
        problem, monkeypatch):
    import attrib_torch.inverses as inverses
    from torch import nn
    from torch.func import functional_call
    from torch.utils.data import DataLoader, TensorDataset

    model = nn.Linear(64, 10)
    model.load_state_dict({k: v.float() for k, v in problem.params.items()})

    def loss(params, data):
        return nn.functional.cross_entropy(functional_call(model, params, (data[0],)), data[1])

    def loader(x, y):
        return DataLoader(TensorDataset(x.float(), y), batch_size=50)

    train, test = loader(problem.x_train, problem.y_train), loader(problem.x_test, problem.y_test)
    dtypes = []

    def watched(*args, dtype, **kwargs):
        dtypes.append(dtype)
        return real(*args, dtype=dtype, **kwargs)

    real = inverses.arnoldi
    monkeypatch.setattr(inverses, "arnoldi", watched)

    def scores():
        attributor = IFAttributorArnoldi(AttributionTask(loss, model, model.state_dict()), proj_dim=30, max_iter=60,
                                         regularization=1e-3, show_progress=False)
        attributor.cache(train)
        return attributor.attribute(train, test)

    in_float32 = scores()
    assert dtypes == [torch.float32] and in_float32.dtype == torch.float32
    dtypes.clear()
    monkeypatch.setattr(inverses, "_semi_orthogonal", lambda orthogonality, dtype: dtype == torch.float64)
    in_float64 = scores()
    assert dtypes == [torch.float32, torch.float64]
    assert relative_error(in_float32.double(), in_float64.double()) < 1e-4
