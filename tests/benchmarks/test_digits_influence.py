import re

import torch

from attrib_core import per_sample_grad
from benchmarks.digits import cross_entropy, fit, l2_objective, load_digits_split, softmax_regression
from benchmarks.digits_influence import main


def test_fit_reaches_the_optimum_of_the_objective():
    split = load_digits_split(200, seed=1)
    model = softmax_regression(seed=1)
    params = fit(model, split.x_train, split.y_train, l2=1e-2)
    live = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    objective = l2_objective(model, 1e-2)(live, (split.x_train, split.y_train))
    grads = torch.autograd.grad(objective, list(live.values()))
    assert max(float(g.abs().max()) for g in grads) < 1e-6
    # Per-sample gradients of the data term average to minus the L2 term's gradient.
    g = per_sample_grad(cross_entropy(model))(params, (split.x_train, split.y_train)).mean(0)
    l2_grad = 1e-2 * torch.cat([p.reshape(-1) for p in params.values()])
    torch.testing.assert_close(g, -l2_grad, atol=1e-6, rtol=0)


def test_main_job_explains_and_agrees_with_leave_one_out(capsys):
    main(["--n-train", "300", "--show", "2", "--loo", "9"])
    out = capsys.readouterr().out
    assert out.count("strongest proponents") == 2
    assert "scores (300, 1497)" in out
    pearson = float(re.search(r"Pearson (-?[\d.]+)", out).group(1))
    assert pearson > 0.95
