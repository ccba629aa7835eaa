"""EK-FAC-preconditioned influence on projected gradients, with streaming top-k proponents.

The estimator, for training image ``i`` and test image ``j``:

    score(i, j) = ⟨R g_i, R (F̂ + λ I)⁻¹ g_j⟩,

with ``g`` the per-example gradients of the cross-entropy of an MLP fitted to
scikit-learn's digits, ``F̂`` the EK-FAC approximation of its empirical Fisher
(George et al., 2018; Grosse et al., 2023), ``λ`` the L2 coefficient the model
was trained with, and ``R`` one random Rademacher projection ``P -> DIM`` applied
to both sides (Johnson-Lindenstrauss, as in TRAK), so that ``score`` estimates
the influence ``g_iᵀ (F̂ + λ I)⁻¹ g_j``. A positive score means the training image
helps the test prediction. Each test image's ``K`` largest scores are found by
streaming the training set (``topk_scores``), never forming ``(n_train, n_test)``.

Run from the repository root: ``python -m examples.ekfac_projected_topk``.
"""

from typing import NamedTuple

import torch

from attrib_core import EKFAC, TopK, ekfac, per_sample_grad, projector, topk_scores
from benchmarks.digits import cross_entropy, fit, load_digits_split, mlp

N_TRAIN, N_TEST, HIDDEN, DIM, K, L2, SEED = 300, 20, 16, 256, 5, 1e-3, 0


class Result(NamedTuple):
    topk: TopK  # values and indices (N_TEST, K): each test image's proponents, best first
    model: torch.nn.Module
    params: dict
    curvature: EKFAC
    train: tuple  # (x (N_TRAIN, 64), y (N_TRAIN,))
    test: tuple  # (x (N_TEST, 64), y (N_TEST,))


def main() -> Result:
    data = load_digits_split(N_TRAIN, seed=SEED)
    train, test = (data.x_train, data.y_train), (data.x_test[:N_TEST], data.y_test[:N_TEST])
    model = mlp(HIDDEN, seed=SEED)
    params = fit(model, *train, l2=L2, max_iter=200)
    loss = cross_entropy(model)
    curvature = ekfac(model, loss, params, [train])  # both Linear layers: every parameter, in params order
    grad = per_sample_grad(loss)
    g_train, g_test = grad(params, train), grad(params, test)  # (N_TRAIN, P), (N_TEST, P)
    project = projector(g_train.shape[1], DIM, kind="rademacher", seed=SEED)
    topk = topk_scores(project(g_train), project(curvature.solve(g_test, damping=L2).x), K)
    for j, top in enumerate(topk.indices[:3]):
        print(f"test image {j} (a {int(test[1][j])}): proponents {top.tolist()}, labelled {train[1][top].tolist()}")
    return Result(topk, model, params, curvature, train, test)


if __name__ == "__main__":
    main()
