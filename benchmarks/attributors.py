"""End-to-end timing of every attributor on scikit-learn digits, with dattri side by side when installed.

Setting: MLP 64-128-10 (9,610 parameters, float32) fitted on 1,000 training
images; 100 test images; train loader batches of 250, one test batch of 100.
Each attributor is timed from construction through ``cache`` and ``attribute``;
its scores are compared with the explicit attributor's (Pearson correlation)
and checked to be finite. With dattri importable, the same classes from dattri
run on the identical task, model, loss and loaders, and the ratio is printed;
dattri is never a dependency.

    python -m benchmarks.attributors [--methods explicit,cg,...] [--dattri-methods cg,datainf,...] [--no-data-methods]
        [--repeats N]

``--repeats N`` reports each method's median over N runs, each construction through scores
with no warm-up, for both libraries alike (single runs of these 0.01-0.3 s calls varied by
up to 2x between runs on this machine).

The second table times TracIn over 5 checkpoints, Grad-Dot, Grad-Cos, TRAK with a
512-dimensional projection over 1, 5 and 10 checkpoints, and RPS; dattri's classes of
the same names run on the same model, checkpoints and loaders when it is installed
(dattri's TracIn projects to 512 dimensions by default, ours is exact, so their scores
agree only approximately).
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import Dict, Optional

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

import attrib_torch

from .digits import fit, load_digits_split, margin_and_probability, mlp
from .measure import pearson, timed
from .methods import METHODS as REGISTRY

L2 = 1e-3
DAMPING = 1e-3
# The registry's influence functions, by their attributor classes (dattri's have the same names).
CLASSES = {name: m.attributor for name, m in REGISTRY.items() if m.attributor.startswith("IFAttributor")}
METHODS = tuple(CLASSES)

# Settings shared by ours and dattri's: the issue's workload (CG with 20 steps).
SETTINGS: Dict[str, Dict] = {
    "explicit": {"regularization": DAMPING},
    "cg": {"max_iter": 20, "tol": 1e-7, "regularization": DAMPING},
    "lissa": {"batch_size": 50, "recursion_depth": 100, "scaling": 5.0, "damping": DAMPING},
    "datainf": {"regularization": 0.0},
    "arnoldi": {"proj_dim": 100, "max_iter": 100, "regularization": DAMPING},  # needs P >= 100
    "ekfac": {"damping": DAMPING},
}


def build(seed: int, n_train: int = 1000, hidden: int = 128):
    split = load_digits_split(n_train, seed=seed, dtype=torch.float32)
    model = mlp(hidden, seed=seed, dtype=torch.float32)
    params = fit(model, split.x_train, split.y_train, l2=L2, max_iter=300)
    model.load_state_dict(params)

    def loss(params, data):
        x, y = data
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    train = DataLoader(TensorDataset(split.x_train, split.y_train), batch_size=250, shuffle=False)
    test = DataLoader(TensorDataset(split.x_test[:100], split.y_test[:100]), batch_size=100, shuffle=False)
    return model, loss, {k: v.clone() for k, v in model.state_dict().items()}, train, test


def run(module, method: str, model, loss, state, train, test, repeats: int = 1) -> tuple[float, torch.Tensor]:
    """Construct, cache and attribute with ``module``'s class for ``method``; seconds (median of cold runs) and scores."""

    def attribute():
        task = module.AttributionTask(loss_func=loss, model=model, checkpoints=state)
        cls = getattr(module, CLASSES[method])
        kwargs = dict(SETTINGS[method])
        if module is attrib_torch:
            kwargs["show_progress"] = False
        attributor = cls(task, **kwargs)
        attributor.cache(train)
        return attributor.attribute(train, test)

    seconds, scores = timed(attribute, repeats, warmup=False)
    return seconds, scores.detach().float().cpu()


def checkpoints_of(state, count: int):
    """``count`` checkpoints along a line toward the fitted weights (a stand-in for a training run)."""
    return [{k: v * (0.6 + 0.4 * (c + 1) / count) for k, v in state.items()} for c in range(count)]


def run_data_methods(module, model, loss, state, train, test, repeats: int = 1) -> list[tuple[str, float, torch.Tensor]]:
    """TracIn (5 checkpoints), Grad-Dot, Grad-Cos, TRAK (one, 5 and 10 checkpoints, 512 dimensions), RPS.

    ``module`` is :mod:`attrib_torch` or dattri's namespace (whose functions see one
    example at a time, without its batch dimension).
    """
    ours = module is attrib_torch
    margin, probability = margin_and_probability(model, per_example=not ours)
    quiet = {"show_progress": False} if ours else {}
    out = []

    def time_one(name, make, call):
        """Cold runs (their median), construction (``make``) through scores (``call``)."""
        seconds, scores = timed(lambda: call(make()), repeats, warmup=False)
        out.append((name, seconds, scores.detach().float()))

    five = checkpoints_of(state, 5)
    time_one("tracin (5 checkpoints)",
             lambda: module.TracInAttributor(module.AttributionTask(loss, model, five), torch.tensor([0.1] * 5),
                                             False, **quiet),
             lambda a: a.attribute(train, test))
    for name, normalized in (("grad-dot", False), ("grad-cos", True)):
        time_one(name, lambda: module.TracInAttributor(module.AttributionTask(loss, model, state),
                                                       torch.tensor([1.0]), normalized, **quiet),
                 lambda a: a.attribute(train, test))
    for count in (1, 5, 10):
        checkpoints = state if count == 1 else checkpoints_of(state, count)

        def make(checkpoints=checkpoints):
            task = module.AttributionTask(margin, model, checkpoints)  # the margin on both sides, as in the paper
            attributor = module.TRAKAttributor(task, probability, projector_kwargs={"proj_dim": 512}, **quiet)
            attributor.cache(train)
            return attributor

        time_one(f"trak, 512 dimensions, {count} checkpoint{'s' if count > 1 else ''}", make,
                 lambda a: a.attribute(test))

    def make_rps():
        task = module.AttributionTask(loss, model, state, target_func=nn.functional.cross_entropy)
        rps = module.RPSAttributor(task, "2", l2_strength=0.003, epoch=300)
        rps.cache(train)
        return rps

    time_one("rps", make_rps, lambda a: a.attribute(train, test))
    model.load_state_dict(state)
    return out


def dattri_module():
    if importlib.util.find_spec("dattri") is None:
        return None
    from dattri.algorithm import influence_function
    from dattri.task import AttributionTask

    class Namespace:
        pass

    namespace = Namespace()
    namespace.AttributionTask = AttributionTask
    for name in CLASSES.values():
        setattr(namespace, name, getattr(influence_function, name))
    from dattri.algorithm.rps import RPSAttributor
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.algorithm.trak import TRAKAttributor

    namespace.TracInAttributor = TracInAttributor
    namespace.TRAKAttributor = TRAKAttributor
    namespace.RPSAttributor = RPSAttributor
    return namespace


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--dattri-methods", default=",".join(m for m in METHODS if m != "explicit"),
                        help="dattri methods to run when dattri is installed (its explicit takes ~300 s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--data-methods", action=argparse.BooleanOptionalAction, default=True,
                        help="also time TracIn, Grad-Dot, Grad-Cos, TRAK and RPS")
    parser.add_argument("--dattri-data-methods", action=argparse.BooleanOptionalAction, default=True,
                        help="run dattri's TracIn/TRAK/RPS side by side when dattri is installed")
    parser.add_argument("--repeats", type=int, default=1, help="report the median of this many runs of each")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats: expected at least 1, got {args.repeats}")
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}; choose from {METHODS}")
    torch.manual_seed(args.seed)
    model, loss, state, train, test = build(args.seed, args.n_train, args.hidden)
    reference = run(attrib_torch, "explicit", model, loss, state, train, test)[1] if methods else None
    dattri = dattri_module()
    dattri_methods = set(args.dattri_methods.split(",")) if dattri is not None else set()

    P = sum(v.numel() for v in model.parameters())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; digits, MLP 64-{args.hidden}-10 "
          f"(P = {P:,}), {args.n_train:,} train / 100 test, float32; median of {args.repeats} cold run(s) each")
    print("dattri: " + ("installed, run side by side" if dattri is not None else "not installed (ours only)"))
    print("\n| method | ours (s) | finite | vs explicit (Pearson) | dattri (s) | dattri finite | speed-up |")
    print("|---|---:|---|---:|---:|---|---:|")
    for method in methods:
        seconds, scores = run(attrib_torch, method, model, loss, state, train, test, args.repeats)
        row = f"| {method} | {seconds:.2f} | {bool(torch.isfinite(scores).all())} | {pearson(scores, reference):.3f} |"
        if method in dattri_methods:
            try:
                d_seconds, d_scores = run(dattri, method, model, loss, state, train, test, args.repeats)
                row += f" {d_seconds:.2f} | {bool(torch.isfinite(d_scores).all())} | {d_seconds / seconds:.1f}x |"
            except Exception as error:  # noqa: BLE001 - dattri failing is a result to report
                row += f" failed: {type(error).__name__}: {str(error)[:60]} | | |"
        else:
            row += " | | |"
        print(row, flush=True)
    if args.data_methods:
        rows = run_data_methods(attrib_torch, model, loss, state, train, test, args.repeats)
        theirs = {}
        if dattri is not None and args.dattri_data_methods:
            try:
                theirs = {name: (s, sc) for name, s, sc in run_data_methods(dattri, model, loss, state, train, test,
                                                                            args.repeats)}
            except Exception as error:  # noqa: BLE001 - dattri failing is a result to report
                print(f"dattri's TracIn/TRAK/RPS failed: {type(error).__name__}: {str(error)[:120]}")
        print("\n| method | ours (s) | finite | dattri (s) | speed-up | Pearson (ours, dattri) |")
        print("|---|---:|---|---:|---:|---:|")
        for name, seconds, scores in rows:
            row = f"| {name} | {seconds:.3f} | {bool(torch.isfinite(scores).all())} |"
            if name in theirs:
                d_seconds, d_scores = theirs[name]
                row += f" {d_seconds:.3f} | {d_seconds / seconds:.1f}x | {pearson(scores, d_scores):.3f} |"
            else:
                row += " | | |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
