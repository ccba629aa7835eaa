"""TracIn over checkpoints, with each checkpoint's test gradients preconditioned by DataInf.

The estimator, for training image ``i`` and test image ``j``:

    score(i, j) = Σ_c η_c Σ_l g_{i,l}(θ_c)ᵀ (G_{c,l} + λ_{c,l} I)⁻¹ g_{j,l}(θ_c),

summed over checkpoints ``θ_c`` of a gradient-descent run on scikit-learn's
digits, ``η_c`` the learning rate of the phase that ends at ``θ_c`` (TracInCP,
Pruthi et al., 2020), and over the layers ``l`` (each Linear module, weight with
bias). ``g_{i,l}`` is the layer's block of the per-example cross-entropy gradient,
``G_{c,l} = (1/n) Σ_i g_{i,l} g_{i,l}ᵀ`` its empirical Fisher over the training
set, and the inverse is DataInf's (Kwon et al., ICLR 2024), exact for each
rank-one term by Sherman-Morrison:

    (G + λ I)⁻¹ v ≈ (1 / (n λ)) Σ_i (v - g_i (g_iᵀ v) / (λ + ‖g_i‖²)),

with the paper's damping ``λ = 0.1 · mean_i ‖g_i‖² / d_l``.

Run from the repository root: ``python -m examples.tracin_datainf``.
"""

from typing import NamedTuple

import torch

from attrib_core import datainf, inner_products, per_sample_grad, split_by_module
from benchmarks.digits import cross_entropy, load_digits_split, mlp

N_TRAIN, N_TEST, HIDDEN, STEPS, SEED = 300, 20, 16, 20, 0
SCHEDULE = (1.0, 0.5, 0.25)  # learning rate of each phase of STEPS full-batch steps; a checkpoint ends each


class Result(NamedTuple):
    scores: torch.Tensor  # (N_TRAIN, N_TEST)
    checkpoints: list  # [(η_c, params at θ_c)]
    model: torch.nn.Module
    train: tuple  # (x (N_TRAIN, 64), y (N_TRAIN,))
    test: tuple  # (x (N_TEST, 64), y (N_TEST,))


def main() -> Result:
    data = load_digits_split(N_TRAIN, seed=SEED)
    train, test = (data.x_train, data.y_train), (data.x_test[:N_TEST], data.y_test[:N_TEST])
    model = mlp(HIDDEN, seed=SEED)
    loss = cross_entropy(model)
    params, checkpoints = {k: v.detach() for k, v in model.named_parameters()}, []
    for lr in SCHEDULE:
        for _ in range(STEPS):
            step = torch.func.grad(loss)(params, train)
            params = {k: p - lr * step[k] for k, p in params.items()}
        checkpoints.append((lr, params))
    grad = per_sample_grad(loss)
    scores = torch.zeros(N_TRAIN, N_TEST, dtype=torch.float64)
    for lr, theta in checkpoints:
        g_train, g_test = (split_by_module(grad(theta, part), theta) for part in (train, test))  # {layer: (n, P_l)}
        solved = datainf(g_train, g_test).x
        scores += lr * sum(inner_products(g_train[layer], solved[layer]) for layer in g_train)
    for j, top in enumerate(scores[:, :3].topk(5, dim=0).indices.T):  # the 5 best of 3 test images
        print(f"test image {j} (a {int(test[1][j])}): proponents {top.tolist()}, labelled {train[1][top].tolist()}")
    return Result(scores, checkpoints, model, train, test)


if __name__ == "__main__":
    main()
