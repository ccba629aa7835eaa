"""The extreme eigenvalues of a setting's mini-batch Hessians: what LiSSA's ``scaling`` must exceed.

LiSSA's recursion ``h <- v + (1 - damping) h - H_batch h / scaling`` contracts only
while every eigenvalue ``λ`` of every mini-batch Hessian keeps
``-damping < λ / scaling < 2 - damping`` (:func:`attrib_core.lissa`). So ``scaling``
must exceed ``λ_max / (2 - damping)``, and a negative eigenvalue needs
``damping * scaling > |λ_min|`` (else that direction grows, slowly when it is small).

For random mini-batches of the size the benchmark's LiSSA draws (and for the whole
training set) this prints ``λ_max`` and ``λ_min`` of the training loss's Hessian at
the setting's fitted model, as Ritz values of a Lanczos run
(:func:`attrib_core.arnoldi`; they lie inside the spectrum and converge to its ends
first), and the smallest ``scaling`` that contracts on every batch seen::

    python -m benchmarks.minibatch_spectrum --setting cnn [--batches 6 --batch-size 50 --steps 60]
"""

from __future__ import annotations

import argparse
import warnings
from typing import List, NamedTuple, Optional

import torch

from attrib_core import arnoldi, make_hvp

from .digits import cross_entropy
from .measure import timed
from .settings import SETTINGS, Setting, make_setting


class Extremes(NamedTuple):
    batch: str  # "full" or "batch <i>"
    size: int  # training images in it
    largest: float  # λ_max
    smallest: float  # λ_min (negative: the Hessian is indefinite there)


def extremes(setting: Setting, rows: torch.Tensor, steps: int) -> tuple[float, float]:
    """The largest and smallest Ritz values of the Hessian of the mean loss on the training ``rows``."""
    d = setting.data
    f = cross_entropy(setting.model)
    mv = make_hvp(f, setting.params, (d.x_train[rows], d.y_train[rows]))
    dim = sum(p.numel() for p in setting.params.values())
    steps = min(steps, dim)
    with warnings.catch_warnings():  # a breakdown returns fewer Ritz values than asked, all of them exact: fine here
        warnings.filterwarnings("ignore", message="arnoldi: the Krylov space became invariant")
        ritz = arnoldi(mv, dim, max_steps=steps, top_k=steps).eigenvalues
    return float(ritz.max()), float(ritz.min())


def spectrum(setting: Setting, *, batches: int, batch_size: int, steps: int, seed: int = 0) -> List[Extremes]:
    """The full batch's extremes, then those of ``batches`` random mini-batches of distinct training images."""
    n = len(setting.data.y_train)
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size: expected 1..{n} (the training set's size), got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    out = [Extremes("full", n, *extremes(setting, torch.arange(n), steps))]
    for i in range(batches):
        rows = torch.randperm(n, generator=generator)[:batch_size]
        out.append(Extremes(f"batch {i}", batch_size, *extremes(setting, rows, steps)))
    return out


def smallest_scaling(found: List[Extremes], damping: float = 0.0) -> float:
    """The ``scaling`` below which some batch's ``λ_max`` leaves LiSSA's contraction interval."""
    if not 0 <= damping < 2:
        raise ValueError(f"damping: expected 0 <= damping < 2, got {damping}")
    return max(e.largest for e in found) / (2 - damping)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", default="cnn", choices=SETTINGS)
    parser.add_argument("--batches", type=int, default=6, help="random mini-batches (default 6)")
    parser.add_argument("--batch-size", type=int, default=50, help="the benchmark's LiSSA draws 50")
    parser.add_argument("--steps", type=int, default=60, help="Lanczos steps per batch (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    setting = make_setting(args.setting)
    seconds, found = timed(lambda: spectrum(setting, batches=args.batches, batch_size=args.batch_size,
                                            steps=args.steps, seed=args.seed), warmup=False)
    print(f"digits + {args.setting}: Hessian of the mean cross-entropy at the fitted model, "
          f"{args.steps} Lanczos steps ({seconds:.0f} s)\n")
    print("| batch | λ_max | λ_min |\n|---|---:|---:|")
    for e in found:
        print(f"| {e.batch} ({e.size}) | {e.largest:.4g} | {e.smallest:.4g} |")
    print(f"\nLiSSA contracts on every batch seen only with scaling > {smallest_scaling(found):.3g} "
          f"(λ_max / 2, damping 0); a negative λ_min also needs damping * scaling > |λ_min|.")


if __name__ == "__main__":
    main()
