"""What exact per-example layer factors cost: ``capture_per_example`` against the batch-scaled ``capture``.

    python -m benchmarks.capture [--repeats 5]

``capture`` takes one batched backward pass and multiplies the batch's output
gradients by the batch size, which is each example's own gradient only for a plain
mean of per-example losses. ``capture_per_example`` presents every example as a batch
of one (``vmap`` over zero probes on the layers' outputs, plus one forward pass of one
example for the probes' shapes, with a check that no factored weight is read outside
its layer), exact whatever the loss normalises by. Both run in one process on the same
MLPs (``64 -> width -> width -> 10``, tanh, float32, mean cross-entropy), median of
``--repeats``; the table gives the ratio. On a class-weighted loss the script also
reports how far the batch-scaled factors are from the exact ones (on the first 16 rows).
"""

from __future__ import annotations

import argparse
from typing import List, Optional

import torch
from torch import nn
from torch.func import functional_call

from attrib_core import capture, capture_per_example, factored_dense, layer_specs

from .measure import timed

SHAPES = ((250, 128), (1000, 512), (256, 2048))


def workload(batch: int, width: int, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
    x, y = torch.randn(batch, 64), torch.randint(0, 10, (batch,))
    params = {k: v.detach() for k, v in model.named_parameters()}
    return model, params, (x, y)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", default=",".join(f"{b}x{w}" for b, w in SHAPES),
                        help="comma-separated BATCHxWIDTH")
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\n| batch x width | capture (batch-scaled) | capture_per_example (exact) | ratio | "
          "class-weighted: batch-scaled error |")
    print("|---|---:|---:|---:|---:|")
    for batch, width in shapes:
        model, params, data = workload(batch, width)
        specs = layer_specs(model, params, None)
        weight = torch.linspace(0.2, 3.0, 10)

        def mean_loss(p, b):
            return nn.functional.cross_entropy(functional_call(model, p, (b[0],)), b[1])

        def weighted_loss(p, b):
            return nn.functional.cross_entropy(functional_call(model, p, (b[0],)), b[1], weight=weight)

        scaled = timed(lambda: capture(model, mean_loss, params, data, specs), args.repeats).seconds
        exact = timed(lambda: capture_per_example(model, mean_loss, params, data, specs), args.repeats).seconds
        names = list(params)
        head = tuple(t[:16] for t in data)  # explicit gradients of 16 rows: (16, P) stays small for wide layers
        wrong = factored_dense(capture(model, weighted_loss, params, head, specs), specs, names)
        right = factored_dense(capture_per_example(model, weighted_loss, params, head, specs), specs, names)
        error = float((wrong - right).norm() / right.norm())
        print(f"| {batch} x {width} | {scaled * 1e3:.1f} ms | {exact * 1e3:.1f} ms | {exact / scaled:.2f}x | "
              f"{error:.2f} |")


if __name__ == "__main__":
    main()
