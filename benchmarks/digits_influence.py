"""The main job: explicit influence functions on scikit-learn's digits, checked against retraining.

Fits L2-regularised softmax regression on 1,000 digit images, scores every
(training image, test image) pair by the influence ``g_trainᵀ H⁻¹ g_test``
with ``attrib_torch.IFAttributorExplicit`` (exact Hessian, Cholesky solve),
prints the strongest proponents and opponents of a few test images (streaming
top-k), and then checks the scores against leave-one-out retraining for one
test image.

    python -m benchmarks.digits_influence [--n-train 1000] [--l2 1e-3] [--show 3] [--loo 30]

Sign convention: a positive score means the training image helps the test
prediction (removing it raises the test loss).
"""

from __future__ import annotations

import argparse

import torch

from torch.utils.data import DataLoader, TensorDataset

from attrib_torch import AttributionTask, IFAttributorExplicit

from .digits import accuracy, cross_entropy, fit, load_digits_split, softmax_regression
from .measure import pearson, timed

_SHADES = " .:-=+*#%@"


def loaders(split, batch_size: int = 250):
    train = DataLoader(TensorDataset(split.x_train, split.y_train), batch_size=batch_size, shuffle=False)
    test = DataLoader(TensorDataset(split.x_test, split.y_test), batch_size=batch_size, shuffle=False)
    return train, test


def influence_attributor(model, params, split, *, l2) -> IFAttributorExplicit:
    """Explicit influence of the cross-entropy with the L2 term as the Hessian's regularization.

    ``H + l2·I`` is exactly the Hessian of the training objective, while the
    per-example gradients are of the cross-entropy alone: the term a removal takes away.
    """
    task = AttributionTask(cross_entropy(model), model, params)
    attributor = IFAttributorExplicit(task, regularization=l2, show_progress=False)
    attributor.cache(loaders(split)[0])
    return attributor


def leave_one_out_check(model, params, split, scores, *, l2, test_index, count, seed):
    """Refit without each of ``count`` training images; correlate predicted and actual loss changes."""
    n = len(split.y_train)
    column = scores[:, test_index]
    third = max(1, count // 3)
    order = torch.argsort(column, descending=True)
    others = order[third:-third]
    picks = others[torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))[:third]]
    chosen = torch.cat([order[:third], order[-third:], picks])
    loss = cross_entropy(model)
    test = (split.x_test[test_index : test_index + 1], split.y_test[test_index : test_index + 1])
    base = float(loss(params, test))
    actual = []
    for i in chosen.tolist():
        weights = torch.ones(n)
        weights[i] = 0.0
        refit = fit(model, split.x_train, split.y_train, l2=l2, weights=weights, init=params)
        actual.append(float(loss(refit, test)) - base)
    predicted = column[chosen] / n
    actual_t = torch.tensor(actual, dtype=predicted.dtype)
    return pearson(predicted, actual_t), pearson(_ranks(predicted), _ranks(actual_t)), len(chosen)


def first_of_each_label(labels: torch.Tensor, count: int) -> list[int]:
    """Positions of the first ``count`` test images with distinct labels, so the examples vary."""
    seen: dict[int, int] = {}
    for j, label in enumerate(labels.tolist()):
        seen.setdefault(label, j)
    return sorted(seen.values())[:count]


def _ranks(v: torch.Tensor) -> torch.Tensor:
    ranks = torch.empty_like(v)
    ranks[torch.argsort(v)] = torch.arange(len(v), dtype=v.dtype)
    return ranks


def render(images: list[torch.Tensor], captions: list[str]) -> str:
    """8x8 images side by side as text, darkest ink as '@'."""
    width = 12
    lines = ["".join(c[: width - 1].ljust(width) for c in captions)]
    for row in range(8):
        cells = []
        for img in images:
            pixels = img.reshape(8, 8)[row]
            cells.append("".join(_SHADES[min(9, int(p * 9.999))] for p in pixels).ljust(width))
        lines.append("".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=1000, help="training images (default 1000)")
    parser.add_argument("--l2", type=float, default=1e-3, help="L2 strength of the objective")
    parser.add_argument("--show", type=int, default=3, help="test images to explain")
    parser.add_argument("--top", type=int, default=3, help="proponents and opponents shown per image")
    parser.add_argument("--loo", type=int, default=30, help="leave-one-out refits for the check (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.l2 <= 0:
        parser.error("--l2 must be > 0 (the Hessian of softmax regression is singular without it)")

    split = load_digits_split(args.n_train, seed=args.seed)
    model = softmax_regression(seed=args.seed)
    t_fit, params = timed(lambda: fit(model, split.x_train, split.y_train, l2=args.l2), warmup=False)

    def explain():
        attributor = influence_attributor(model, params, split, l2=args.l2)
        train, test = loaders(split)
        scores = attributor.attribute(train, test)
        proponents = attributor.topk(test, args.top, proponents=True)
        opponents = attributor.topk(test, args.top, proponents=False)
        return attributor, scores, proponents, opponents

    t_score, (attributor, scores, proponents, opponents) = timed(explain, warmup=False)
    method = attributor.factors[0].method
    n_params = sum(p.numel() for p in params.values())
    print(
        f"digits: {len(split.y_train)} training / {len(split.y_test)} test images; softmax regression "
        f"({n_params} parameters), test accuracy {accuracy(model, params, split.x_test, split.y_test):.3f}"
    )
    print(
        f"fit {t_fit:.2f} s; explicit influence (per-sample gradients, {n_params}x{n_params} "
        f"Hessian, {method} solve, scores and top-{args.top} lists) {t_score:.2f} s -> scores {tuple(scores.shape)}"
    )
    for j in first_of_each_label(split.y_test, args.show):
        column = scores[:, j]
        pro = proponents.indices[j].tolist()
        con = opponents.indices[j].tolist()
        print(f"\ntest image {j} (label {int(split.y_test[j])}):")
        for name, picks in (("proponents", pro), ("opponents", con)):
            print(f"  strongest {name}: " + ", ".join(
                f"#{i} (label {int(split.y_train[i])}, score {float(column[i]):+.3g})" for i in picks
            ))
        print(render(
            [split.x_test[j], split.x_train[pro[0]], split.x_train[con[0]]],
            [f"test {int(split.y_test[j])}", f"pro {int(split.y_train[pro[0]])}", f"con {int(split.y_train[con[0]])}"],
        ))
    if args.loo > 0:
        t_loo, (r, rho, count) = timed(lambda: leave_one_out_check(
            model, params, split, scores, l2=args.l2, test_index=0, count=args.loo, seed=args.seed
        ), warmup=False)
        print(
            f"\nleave-one-out check on test image 0 ({count} refits, {t_loo:.1f} s): "
            f"predicted vs actual change in test loss, Pearson {r:.3f}, Spearman {rho:.3f}"
        )


if __name__ == "__main__":
    main()
