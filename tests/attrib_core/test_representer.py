"""Representer points: at the fitted layer's stationary point, the logits split exactly over training examples."""

import pytest
import torch
from torch import nn

from attrib_core import (
    fit_final_layer,
    label_columns,
    representer_scores,
    representer_self_scores,
    representer_targets,
    representer_weights,
)


@pytest.mark.parametrize("classes", [1, 3])
def test_logits_are_the_sum_of_the_representer_values(classes):
    g = torch.Generator().manual_seed(0)
    features = torch.cat([torch.randn(30, 4, generator=g, dtype=torch.float64), torch.ones(30, 1, dtype=torch.float64)], 1)
    labels = torch.randint(0, max(classes, 2), (30,), generator=g)
    if classes == 1:
        def loss(logits, targets):
            return nn.functional.binary_cross_entropy_with_logits(logits, targets)
    else:
        loss = nn.functional.cross_entropy
    targets = representer_targets(labels, torch.zeros(30, classes, dtype=torch.float64), fit_to="labels")
    W = fit_final_layer(loss, features, targets, torch.zeros(classes, 5, dtype=torch.float64), l2=0.05,
                        max_steps=500)
    alpha = representer_weights(loss, features, targets, W, l2=0.05, n=30)
    torch.testing.assert_close(alpha.T @ features, W, rtol=1e-5, atol=1e-6)  # W = Σ_i α_i f_iᵀ: stationary
    test = torch.randn(4, 5, generator=g, dtype=torch.float64)
    test_labels = torch.randint(0, max(classes, 2), (4,), generator=g)
    scores = representer_scores(features, alpha, test, test_labels)
    logits = test @ W.T
    own = logits[:, 0] * (2 * test_labels - 1) if classes == 1 else logits.gather(1, test_labels[:, None])[:, 0]
    torch.testing.assert_close(scores.sum(0), own, rtol=1e-5, atol=1e-6)
    diagonal = representer_scores(features, alpha, features, labels).diagonal()
    torch.testing.assert_close(representer_self_scores(features, alpha, labels), diagonal)


def test_targets_and_binary_labels_are_checked():
    outputs = torch.tensor([[0.0], [2.0]])
    torch.testing.assert_close(representer_targets(torch.tensor([0, 1]), outputs, fit_to="predictions"),
                               torch.sigmoid(outputs))
    with pytest.raises(ValueError, match="fit_to"):
        representer_targets(torch.tensor([0, 1]), outputs, fit_to="logits")
    with pytest.raises(ValueError, match="labels: a binary head"):
        label_columns(torch.ones(2, 1), torch.tensor([2]))
