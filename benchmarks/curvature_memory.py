"""Peak memory of fitting curvature as the training set grows, through the attributors.

Setting: MLP 64-32-10 (2,410 parameters, float32, seeded initialisation), training
sets of N digits tiled with seeded noise (as ``benchmarks.scale``), a DataLoader
of batches of 64. Three statistics of the full training loss, fitted by the
attributors' ``cache``, each in a fresh process so its peak resident memory is its own:

- ``explicit``: ``IFAttributorExplicit``, the dense ``(P, P)`` Hessian accumulated over batches and factored;
- ``cg``: ``IFAttributorCG``, its operator applied in 10 CG steps to 8 test gradients;
- ``ekfac``: ``IFAttributorEKFAC``, both passes of the fit.

The curvature attributors pass over the loader in groups of batches whose saved
activations stay within a budget (``--group-mib``, default the library's 32 MiB;
``0`` keeps every loader batch on its own), so memory is bounded by the budget
and not by N. ``joined`` instead runs the same statistic on the whole training
set as one batch (the attributors' path before they summed over batches).

    python -m benchmarks.curvature_memory [--sizes 1000,16000] [--stats explicit,cg,ekfac] [--paths 32,0,joined]
"""

from __future__ import annotations

import argparse
import json
import resource

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from .measure import in_fresh_process, timed
from .scale import tiled_digits

BATCH = 64


def one(stat: str, path: str, n: int) -> dict:
    import attrib_torch
    import attrib_torch.inverses
    from attrib_core import per_sample_grad

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = tiled_digits(n, seed=1)
    batch = n if path == "joined" else BATCH
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)
    if path != "joined":
        attrib_torch.inverses._GROUP_BYTES = max(1, int(float(path) * 2**20))

    def loss(p, data):
        return nn.functional.cross_entropy(functional_call(model, p, (data[0],)), data[1])

    task = attrib_torch.AttributionTask(loss, model, state)
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def fit():
        """The statistic fitted through the attributor's ``cache``; a tensor of it, to check it is finite."""
        if stat == "explicit":
            attributor = attrib_torch.IFAttributorExplicit(task, regularization=1e-3, show_progress=False)
            attributor.cache(loader)
            return attributor.factors[0].factor
        if stat == "cg":
            attributor = attrib_torch.IFAttributorCG(task, max_iter=10, tol=0.0, regularization=1e-3,
                                                     show_progress=False)
            attributor.cache(loader)
            params = {k: v.detach() for k, v in model.named_parameters()}
            return attributor.transform_test_rep(0, per_sample_grad(loss)(params, (x[:8], y[:8])))
        attributor = attrib_torch.IFAttributorEKFAC(task, damping=1e-3, show_progress=False)
        attributor.cache(loader)
        return attributor._fits[0].layers[0].eigenvalues

    seconds, out = timed(fit, warmup=False)  # one cold run: a warm-up would fit it twice and raise the peak
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"stat": stat, "path": path, "n": n, "seconds": seconds, "peak_mib": peak_kib / 1024,
            "before_mib": base_kib / 1024, "finite": bool(torch.isfinite(out).all())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,16000")
    parser.add_argument("--stats", default="explicit,cg,ekfac")
    parser.add_argument("--paths", default="32,0,joined",
                        help="group budgets in MiB (0: every loader batch alone) and/or 'joined'")
    parser.add_argument("--single", nargs=3, metavar=("STAT", "PATH", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.single:
        stat, path, n = args.single
        print(json.dumps(one(stat, path, int(n))))
        return
    sizes = [int(v) for v in args.sizes.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; MLP 64-32-10, batches of {BATCH}\n")
    print("| statistic | path (group budget) | " + " | ".join(f"peak RSS N={n:,} (MiB)" for n in sizes)
          + f" | ratio {sizes[-1]:,} / {sizes[0]:,} | " + " | ".join(f"seconds N={n:,}" for n in sizes) + " |")
    print("|---|---|" + "---:|" * (2 * len(sizes) + 1))
    for stat in args.stats.split(","):
        for path in args.paths.split(","):
            runs = []
            for n in sizes:
                try:
                    runs.append(in_fresh_process("benchmarks.curvature_memory", stat, path, n))
                except RuntimeError as error:
                    raise SystemExit(f"{stat} {path} {n} failed: {error}") from error
            peaks = [r["peak_mib"] for r in runs]
            label = "joined (one batch)" if path == "joined" else ("per loader batch" if path == "0" else f"{path} MiB")
            print(f"| {stat} | {label} | " + " | ".join(f"{p:.0f}" for p in peaks) + f" | {peaks[-1] / peaks[0]:.2f} | "
                  + " | ".join(f"{r['seconds']:.2f}" for r in runs) + " |", flush=True)


if __name__ == "__main__":
    main()
