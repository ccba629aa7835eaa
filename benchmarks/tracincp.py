"""Captum-style TracInCP on scikit-learn digits: ours against a brute-force loop, and against captum when installed.

Two workloads, float32, 1,000 training and 100 test images, checkpoints saved to a
temporary directory (the fitted weights and two points on the way to them, learning
rates 0.1):

- ``logreg``: softmax regression 64 -> 10, the setting of captum's published timing.
- ``mlp``: MLP 64-128-10 (9,610 parameters).

For each: influence scores ``(100, 1000)``, self influence over the training set and
the top-10 proponents, timed from construction (median of 5 runs); a brute-force loop of
``torch.autograd.grad`` over examples gives the reference scores (and its time). With
captum importable, its ``TracInCP`` runs on the identical model, checkpoints and data
in its default setting (per-example loss, ``sample_wise_grads_per_batch=False``) and
its fastest (summed loss, ``sample_wise_grads_per_batch=True``), and its
``TracInCPFast`` beside ours; captum is never a dependency.

    python -m benchmarks.tracincp [--models logreg,mlp] [--no-loop]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch.utils.data import TensorDataset

import attrib_torch

from .digits import fit, load_digits_split, mlp, softmax_regression
from .measure import Timing, timed

L2 = 1e-3
RATE = 0.1
MODELS: Dict[str, Callable[[], nn.Module]] = {
    "logreg": lambda: softmax_regression(dtype=torch.float32),
    "mlp": lambda: mlp(128, dtype=torch.float32),
}


def save_checkpoints(model: nn.Module, directory: str, x, y) -> List[str]:
    """Three checkpoints: the fitted weights and two scaled-down points before them."""
    fitted = fit(model, x, y, l2=L2, max_iter=200)
    paths = []
    for c, scale in enumerate((0.5, 0.8, 1.0)):
        path = os.path.join(directory, f"checkpoint-{c}.pt")
        state = {k: v * scale for k, v in fitted.items()}
        torch.save({"model_state_dict": state, "learning_rate": RATE}, path)
        paths.append(path)
    return paths


def load(model: nn.Module, path: str) -> float:
    saved = torch.load(path, weights_only=True)
    model.load_state_dict(saved["model_state_dict"])
    return saved["learning_rate"]


def brute_force(model: nn.Module, paths: List[str], train, test) -> torch.Tensor:
    """``(n_test, n_train)`` by one ``torch.autograd.grad`` per example and checkpoint."""
    total = 0
    for path in paths:
        rate = load(model, path)
        params = list(model.parameters())

        def grads(x, y):
            rows = []
            for i in range(len(y)):
                loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
                rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
            return torch.stack(rows)

        total = total + rate * grads(*test) @ grads(*train).T
    return total


REPEAT = 5  # every time is the median of REPEAT runs, each from construction (no warm-up)


def ours(model, directory, train, test) -> Dict[str, Timing]:
    data = TensorDataset(*train)
    loss = nn.CrossEntropyLoss(reduction="none")

    def make():
        return attrib_torch.TracInCP(model, data, directory, checkpoints_load_func=load, loss_fn=loss, batch_size=1000)

    final = list(model.modules())[-1]  # the last Linear (the model itself for logistic regression)
    calls = {
        "scores": lambda: make().influence(test),
        "self influence": lambda: make().self_influence(),
        "top-10": lambda: make().influence(test, k=10),
        "fast (final layer) scores": lambda: attrib_torch.TracInCPFast(
            model, final, data, directory, checkpoints_load_func=load, loss_fn=nn.CrossEntropyLoss(reduction="sum"),
            batch_size=250).influence(test),
    }
    return {what: timed(call, REPEAT, warmup=False) for what, call in calls.items()}


def theirs(model, directory, train, test) -> Dict[str, Timing]:
    from captum.influence import TracInCP, TracInCPFast

    data = TensorDataset(*train)
    default = lambda: TracInCP(model, data, directory, checkpoints_load_func=load,  # noqa: E731
                               loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=250)
    fastest = lambda: TracInCP(model, data, directory, checkpoints_load_func=load,  # noqa: E731
                               loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=1000,
                               sample_wise_grads_per_batch=True)
    final = list(model.modules())[-1]  # the last Linear (the model itself for logistic regression)
    calls = {
        "scores": lambda: default().influence(test),
        "scores, fastest setting": lambda: fastest().influence(test),
        "self influence": lambda: fastest().self_influence(),
        "top-10": lambda: fastest().influence(test, k=10),
        "fast (final layer) scores": lambda: TracInCPFast(
            model, final, data, directory, checkpoints_load_func=load, loss_fn=nn.CrossEntropyLoss(reduction="sum"),
            batch_size=250).influence(test),
    }
    return {what: timed(call, REPEAT, warmup=False) for what, call in calls.items()}


def agreement(a: torch.Tensor, b: torch.Tensor) -> str:
    if isinstance(a, tuple):  # top-k results: compare the indices
        return f"{float((a[0] == b[0]).double().mean()):.3f} of indices equal"
    a, b = a.detach().double(), b.detach().double()
    return f"max rel. diff {float((a - b).abs().max() / b.abs().max()):.1e}"


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="logreg,mlp")
    parser.add_argument("--loop", action=argparse.BooleanOptionalAction, default=True,
                        help="time the brute-force loop (about 10 s per model)")
    args = parser.parse_args(argv)
    captum = importlib.util.find_spec("captum") is not None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; digits, 1,000 train / 100 test, float32, "
          f"3 checkpoints; captum: {'installed, run side by side' if captum else 'not installed (ours only)'}")
    split = load_digits_split(1000, seed=0, dtype=torch.float32)
    train, test = (split.x_train, split.y_train), (split.x_test[:100], split.y_test[:100])
    for name in args.models.split(","):
        model = MODELS[name]()
        with tempfile.TemporaryDirectory() as directory:
            paths = save_checkpoints(model, directory, *train)
            mine = ours(model, directory, train, test)
            print(f"\n### {name} ({sum(p.numel() for p in model.parameters()):,} parameters)\n")
            if args.loop:
                seconds, reference = timed(lambda: brute_force(model, paths, train, test), warmup=False)
                print(f"brute-force loop: {seconds:.2f} s; ours vs loop: {agreement(mine['scores'][1], reference)}, "
                      f"{seconds / mine['scores'][0]:.0f}x faster\n")
            other = theirs(model, directory, train, test) if captum else {}
            print("| what | ours (s) | captum (s) | captum / ours | agreement |")
            print("|---|---:|---:|---:|---|")
            for what, (seconds, value) in mine.items():
                row = f"| {what} | {seconds:.3f} |"
                if what in other:
                    t, v = other[what]
                    row += f" {t:.3f} | {t / seconds:.1f}x | {agreement(value, v)} |"
                else:
                    row += " | | |"
                print(row)
            if "scores, fastest setting" in other:
                t, v = other["scores, fastest setting"]
                print(f"| scores (captum's fastest setting) | {mine['scores'][0]:.3f} | {t:.3f} | "
                      f"{t / mine['scores'][0]:.1f}x | {agreement(mine['scores'][1], v)} |")


if __name__ == "__main__":
    main()
