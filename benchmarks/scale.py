"""How Grad-Dot and TRAK grow with the training set: time and peak memory at N = 1,000, 2,000, 4,000.

Setting: MLP 64-1024-1024-10 (1.1M parameters, float32, seeded initialisation),
training sets of N digits tiled with seeded noise (so N can exceed the 1,797
images), 200 test points, projection to 2,048 dimensions, dense (Rademacher) or
sparse (SJLT). Each training and test example is projected once, so cost should
grow linearly in N + N_test. Every configuration runs in a fresh process, so
its peak resident memory is its own.

    python -m benchmarks.scale [--sizes 1000,2000,4000] [--kinds rademacher,sjlt] [--methods grad-dot,trak]
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

N_TEST = 200
PROJ_DIM = 2048


def tiled_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    index = torch.arange(n) % len(y)
    noise = 0.05 * torch.randn(n, 64, generator=torch.Generator().manual_seed(seed))
    return x[index] + noise, y[index]


def one(method: str, kind: str, n: int) -> dict:
    import attrib_torch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1024), nn.Tanh(), nn.Linear(1024, 1024), nn.Tanh(), nn.Linear(1024, 10))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = tiled_digits(n + N_TEST, seed=1)
    train = DataLoader(TensorDataset(x[:n], y[:n]), batch_size=32, shuffle=False)
    test = DataLoader(TensorDataset(x[n:], y[n:]), batch_size=32, shuffle=False)

    def loss(params, data):
        return nn.functional.cross_entropy(functional_call(model, params, (data[0],)), data[1])

    def margin(params, data):
        logits = functional_call(model, params, (data[0],))
        correct = logits.gather(1, data[1][:, None]).squeeze(1)
        return (correct - torch.logsumexp(logits.scatter(1, data[1][:, None], float("-inf")), dim=1)).sum()

    def probability(params, data):
        return torch.softmax(functional_call(model, params, (data[0],)), dim=1).gather(1, data[1][:, None]).squeeze(1)

    kwargs = {"proj_dim": PROJ_DIM, "proj_type": kind}

    def attribute():
        if method == "grad-dot":
            task = attrib_torch.AttributionTask(loss, model, state)
            return attrib_torch.TracInAttributor(task, [1.0], False, projector_kwargs=kwargs,
                                                 show_progress=False).attribute(train, test)
        task = attrib_torch.AttributionTask(margin, model, state)
        trak = attrib_torch.TRAKAttributor(task, probability, projector_kwargs=kwargs, show_progress=False)
        trak.cache(train)
        return trak.attribute(test)

    seconds, scores = timed(attribute, warmup=False)  # one cold run, as a user's first call
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "kind": kind, "n": n, "seconds": seconds, "peak_gib": peak_kib / 2**20,
            "finite": bool(torch.isfinite(scores).all()), "shape": list(scores.shape)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,2000,4000")
    parser.add_argument("--kinds", default="rademacher,sjlt")
    parser.add_argument("--methods", default="grad-dot,trak")
    parser.add_argument("--single", nargs=3, metavar=("METHOD", "KIND", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.single:
        method, kind, n = args.single
        print(json.dumps(one(method, kind, int(n))))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; MLP 64-1024-1024-10, "
          f"{N_TEST} test points, projection to {PROJ_DIM}\n")
    print("| method | projection | N | seconds | s per 1,000 examples (N + N_test) | peak memory (GiB) |")
    print("|---|---|---:|---:|---:|---:|")
    for method in args.methods.split(","):
        for kind in args.kinds.split(","):
            for n in (int(v) for v in args.sizes.split(",")):
                try:
                    r = in_fresh_process("benchmarks.scale", method, kind, n)
                except RuntimeError as error:
                    print(f"| {method} | {kind} | {n} | failed: {str(error)[:80]} | | |")
                    continue
                per = r["seconds"] / (n + N_TEST) * 1000
                print(f"| {method} | {kind} | {n:,} | {r['seconds']:.1f} | {per:.2f} | {r['peak_gib']:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
