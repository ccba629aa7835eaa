"""The scripts in ``examples/`` run, compute the estimators their docstrings state, and use only public names.

``examples`` is not an installed package (pyproject's discovery leaves it out), so
the scripts are loaded by file path from the repository root. Each estimator is
checked against an oracle that shares none of the steps under test: per-example
gradients by a plain autograd loop, the projection matrix and the EK-FAC matrix
materialised densely, DataInf's formula written out term by term.
"""

import ast
import contextlib
import importlib
import io
import runpy
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

import kernels

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = ("ekfac_projected_topk.py", "tracin_datainf.py")


def run_example(name: str):
    """The script's globals and the value of its ``main()``, its printing captured."""
    namespace = runpy.run_path(str(EXAMPLES / name))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = namespace["main"]()
    assert out.getvalue().count("proponents") == 3  # it reports a few test images
    return namespace, result


def loop_grads(model, params, batch) -> torch.Tensor:
    """``(B, P)``: each example's cross-entropy gradient by its own backward pass, parameters in dict order."""
    x, y = batch
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    rows = []
    for i in range(len(y)):
        logits = functional_call(model, leaves, (x[i : i + 1],))
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y[i : i + 1]), list(leaves.values()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def ekfac_example():
    return run_example("ekfac_projected_topk.py")


@pytest.fixture(scope="module")
def tracin_example():
    return run_example("tracin_datainf.py")


def test_ekfac_example_topk_is_dense_topk_of_projected_preconditioned_scores(ekfac_example):
    ns, result = ekfac_example
    g_train = loop_grads(result.model, result.params, result.train)  # (n_train, P)
    g_test = loop_grads(result.model, result.params, result.test)  # (n_test, P)
    P = g_train.shape[1]
    assert result.curvature.dim == P  # EK-FAC covers every parameter, in the gradients' layout
    F_damped = result.curvature.matvec(torch.eye(P, dtype=torch.float64), damping=ns["L2"])  # (P, P)
    R = kernels.projection_entries(P, ns["DIM"], kind="rademacher", seed=ns["SEED"]).double()  # (P, DIM)
    scores = (g_train @ R) @ (R.T @ torch.linalg.solve(F_damped, g_test.T))  # (n_train, n_test)
    dense = scores.topk(ns["K"], dim=0)
    assert result.topk.indices.shape == (ns["N_TEST"], ns["K"])
    assert torch.equal(result.topk.indices, dense.indices.T)
    torch.testing.assert_close(result.topk.values, dense.values.T, rtol=1e-6, atol=1e-9)


def test_ekfac_example_fits_the_empirical_fisher_of_its_training_set(ekfac_example):
    # EK-FAC's corrected eigenvalues are E_i[(Q_Sᵀ dW_i Q_A)²] in an orthonormal basis, so
    # each layer's trace equals the mean squared norm of the training gradients' block.
    ns, result = ekfac_example
    g_train = loop_grads(result.model, result.params, result.train)
    diagonal = result.curvature.matvec(torch.eye(g_train.shape[1], dtype=torch.float64)).diagonal()
    start = 0
    for names in (("0.weight", "0.bias"), ("2.weight", "2.bias")):
        width = sum(result.params[n].numel() for n in names)
        block = slice(start, start + width)
        torch.testing.assert_close(diagonal[block].sum(), g_train[:, block].pow(2).sum(1).mean())
        start += width
    assert start == g_train.shape[1]


def datainf_by_hand(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(k, d)``: ``(1/(nλ)) Σ_i (v - g_i (g_iᵀ v) / (λ + ‖g_i‖²))``, ``λ = 0.1 · mean_i ‖g_i‖² / d``.

    Written out term by term from Kwon et al. (ICLR 2024), for ``v`` ``(k, d)``.
    """
    n, d = g.shape
    lam = 0.1 * sum(float(g[i] @ g[i]) for i in range(n)) / n / d
    total = torch.zeros_like(v)
    for i in range(n):
        total += v - torch.outer(v @ g[i], g[i]) / (lam + float(g[i] @ g[i]))
    return total / (n * lam)


def test_tracin_datainf_example_equals_the_formula_over_checkpoints(tracin_example):
    ns, result = tracin_example
    assert len(result.checkpoints) == len(ns["SCHEDULE"]) >= 2
    expected = torch.zeros_like(result.scores)
    for lr, params in result.checkpoints:
        g_train = loop_grads(result.model, params, result.train)
        g_test = loop_grads(result.model, params, result.test)
        start = 0
        for module in ("0", "2"):  # DataInf's layers: each Linear, weight with bias
            width = params[f"{module}.weight"].numel() + params[f"{module}.bias"].numel()
            block = slice(start, start + width)
            expected += lr * g_train[:, block] @ datainf_by_hand(g_train[:, block], g_test[:, block]).T
            start += width
        assert start == g_train.shape[1]
    assert result.scores.shape == (ns["N_TRAIN"], ns["N_TEST"])
    torch.testing.assert_close(result.scores, expected, rtol=1e-8, atol=1e-10)


def test_tracin_datainf_example_checkpoints_lie_along_a_training_run(tracin_example):
    _, result = tracin_example
    x, y = result.train

    def training_loss(params):
        return float(torch.nn.functional.cross_entropy(functional_call(result.model, params, (x,)), y))

    initial = {k: v.detach() for k, v in result.model.named_parameters()}
    losses = [training_loss(initial)] + [training_loss(params) for _, params in result.checkpoints]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))
    rates = [lr for lr, _ in result.checkpoints]
    assert len(set(rates)) == len(rates)  # distinct η_c, so a wrong weighting would show


def _core_imports(tree: ast.Module) -> list[tuple[str, str]]:
    """``(package, name)`` for every name the script takes from attrib_core or kernels."""
    found = []
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            top = (node.module or "").split(".")[0]
            if top in ("attrib_core", "kernels"):
                assert node.module == top, f"imports the private module {node.module}"
                found += [(top, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top in ("attrib_core", "kernels"):
                    assert alias.name == top, f"imports the private module {alias.name}"
                    aliases[alias.asname or top] = top
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            found.append((aliases[node.value.id], node.attr))
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_uses_only_public_core_names(script):
    source = (EXAMPLES / script).read_text()
    tree = ast.parse(source)
    imported = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.append(node.module or "")
        elif isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
    assert not [m for m in imported if m.split(".")[0] == "attrib_torch"]
    names = _core_imports(tree)
    assert names, "the example builds on nothing from the core"
    for package, name in names:
        assert name in importlib.import_module(package).__all__, f"{package}.{name} is not public"


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_is_short_and_documented(script):
    tree = ast.parse((EXAMPLES / script).read_text())
    docstring = ast.get_docstring(tree)
    assert docstring and "=" in docstring  # says what it builds, with its formula
    body_start = tree.body[1].lineno  # the first statement after the docstring
    lines = (EXAMPLES / script).read_text().splitlines()[body_start - 1 :]
    assert len([line for line in lines if line.strip()]) <= 45
    assert "main" in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)
