"""Language-model attribution on text that ships with Python: LDS against retrained GPT-2s, and capture throughput.

    PYTHONPATH=. python -m benchmarks.lm [--subsets 32] [--methods grad-dot,logra-8,...] [--throughput] [--arnoldi]
        [--trak-sweep]

A GPT-2 from its config (170k parameters, byte tokens) is trained by full-batch Adam on 512 paragraphs of
``pydoc_data.topics`` (:mod:`benchmarks.lm_data`) and retrained on ``--subsets`` random
halves of them (cached under ``$ATTRIB_CACHE/retrain``); the target is each of 64
test paragraphs' mean token loss, so LDS correlates the attributions' predicted
effect of a half with the loss a model trained on it reaches. Every method attributes
the same trained model with the same loaders; the table gives LDS with its 95%
interval over test sequences and wall seconds (construction through scores).
``--throughput`` times compressed capture against a plain forward+backward of the same
batches, side by side in one process; ``--arnoldi`` times ``IFAttributorArnoldi``'s fit
against as many plain Hessian-vector products over the training set as it iterates.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from typing import Callable, Dict

import torch
from torch.utils.data import DataLoader, Dataset

import attrib_torch as at
from attrib_core import adam_second_moments, lds

from .lm_data import batch_of, gpt2, load_corpus, test_losses, train
from .measure import timed
from .retrain import Data, retrain_lds

STEPS = 60  # full-batch Adam steps (benchmarks.lm_data.train)


class Sequences(Dataset):
    """Rows of a corpus split as Hugging Face dict examples."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.ids, self.mask = ids, mask

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {k: v[0] for k, v in batch_of(self.ids[i : i + 1], self.mask[i : i + 1]).items()}


class Problem:
    """The corpus, the trained model and its loaders, and the retraining ground truth."""

    def __init__(self, n_subsets: int, progress: bool) -> None:
        self.corpus = load_corpus()
        c = self.corpus
        self.model = gpt2()
        self.init = {k: v.clone() for k, v in self.model.state_dict().items()}
        trained = train(self.model, c.train_ids, c.train_mask, steps=STEPS)
        self.state = trained.state
        self.moments = adam_second_moments(trained.optimizer, [n for n, _ in self.model.named_parameters()])
        self.test_loss = float(test_losses(self.model, self.state, c.test_ids, c.test_mask).mean())
        self.train_loader = DataLoader(Sequences(c.train_ids, c.train_mask), batch_size=32)
        self.test_loader = DataLoader(Sequences(c.test_ids, c.test_mask), batch_size=32)
        scratch = gpt2()

        def refit(ids: torch.Tensor, mask: torch.Tensor) -> Dict[str, torch.Tensor]:
            scratch.load_state_dict(self.init)
            return train(scratch, ids, mask, steps=STEPS).state

        def target(state, ids, mask):  # larger is better: minus the test loss
            return -test_losses(scratch, state, ids, mask)

        data = Data(c.train_ids, c.train_mask, c.test_ids, c.test_mask)
        self.truth = retrain_lds(refit, target, data, n_subsets=n_subsets, key=f"lm-gpt2-fullbatch{STEPS}",
                                 progress=progress)

    def task(self) -> at.AttributionTask:
        """The trained model with its per-sequence loss as loss and target."""
        return at.AttributionTask(at.CausalLMLoss(self.model), self.model, self.state)


def _grad_dot(p: Problem) -> torch.Tensor:
    return at.TracInAttributor(p.task(), [1.0], False, show_progress=False).attribute(p.train_loader, p.test_loader)


def _logra(rank: int, kind: str = "logra", preconditioner: str = "fisher") -> Callable[[Problem], torch.Tensor]:
    def run(p: Problem) -> torch.Tensor:
        attributor = at.LoGraAttributor(p.task(), rank=rank, kind=kind, preconditioner=preconditioner,
                                        show_progress=False)
        return attributor.attribute(p.train_loader, p.test_loader)

    return run


def _trackstar(rank: int) -> Callable[[Problem], torch.Tensor]:
    """TrackStar's form: gradients over Adam's sqrt(v̂) (rank-one fit per layer), compressed, whitened by the
    compressed second moment, cosines."""
    def run(p: Problem) -> torch.Tensor:
        attributor = at.LoGraAttributor(p.task(), rank=rank, second_moments=p.moments, normalize=True,
                                        show_progress=False)
        return attributor.attribute(p.train_loader, p.test_loader)

    return run


def _ekfac(query_rank=None) -> Callable[[Problem], torch.Tensor]:
    def run(p: Problem) -> torch.Tensor:
        attributor = at.IFAttributorEKFAC(p.task(), damping="heuristic", query_rank=query_rank, show_progress=False)
        attributor.cache(p.train_loader)
        return attributor.attribute(p.train_loader, p.test_loader)

    return run


def _trak(proj_dim: int, target: str = "margin", regularization: float = 0.0) -> Callable[[Problem], torch.Tensor]:
    """TRAK with ``target``'s gradient as the output function: the summed token margin (``Q`` from the mean label
    probability, :meth:`CausalLMLoss.probabilities`) or the sequence's mean token loss (``Q = 1``)."""
    def run(p: Problem) -> torch.Tensor:
        if target == "margin":
            out = at.CausalLMLoss(p.model, reduction="sum", target="margin")
            probabilities = out.probabilities
        else:
            out = at.CausalLMLoss(p.model)

            def probabilities(params, batch):
                return torch.zeros(batch["input_ids"].shape[0])

        attributor = at.TRAKAttributor(at.AttributionTask(out, p.model, p.state), probabilities,
                                       projector_kwargs={"proj_dim": proj_dim}, regularization=regularization,
                                       show_progress=False)
        attributor.cache(p.train_loader)
        return attributor.attribute(p.test_loader, p.train_loader)

    return run


METHODS: Dict[str, Callable[[Problem], torch.Tensor]] = {
    "grad-dot": _grad_dot,
    "logra-8": _logra(8),
    "logra-16": _logra(16),
    "logra-16-identity": _logra(16, preconditioner="identity"),
    "logra-64-identity": _logra(64, preconditioner="identity"),
    "logra-16-ekfac": _logra(16, preconditioner="ekfac"),
    "logra-64-ekfac": _logra(64, preconditioner="ekfac"),
    "factgrass-16": _logra(16, kind="factgrass"),
    "trackstar-16": _trackstar(16),
    "ekfac": _ekfac(),
    "ekfac-query-rank-8": _ekfac(query_rank=8),
    "trak-512": _trak(512),
    "trak-128": _trak(128),
    "trak-512-loss-reg1": _trak(512, target="loss", regularization=1.0),
}
TRAK_SWEEP = {"target": ("margin", "loss"), "proj_dim": (128, 512, 2048), "regularization": (0.0, 1e-2, 1.0, 100.0)}


def lds_interval(scores: torch.Tensor, p: Problem) -> tuple[float, float]:
    per_test = lds(scores.double(), p.truth.values, p.truth.subsets).per_test
    defined = per_test[~torch.isnan(per_test)]
    return float(defined.mean()), 1.96 * float(defined.std()) / math.sqrt(defined.numel())


def throughput(p: Problem, repeats: int) -> None:
    """Compressed capture (rank 16) vs a plain forward+backward of the same batches, one process."""
    task = p.task()
    loss = task.loss_func
    params = dict(p.model.named_parameters())
    loaded = list(p.train_loader)
    tokens = sum(int(b["attention_mask"].sum()) for b in loaded)

    def plain():
        for batch in loaded:
            grads = torch.autograd.grad(loss(params, batch), list(params.values()))
        return grads

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attributor = at.LoGraAttributor(task, rank=16, preconditioner="identity", show_progress=False)

    def compressed():
        with torch.no_grad():
            return [attributor.generate_train_rep(0, batch) for batch in loaded]

    base = timed(plain, repeats).seconds
    ours = timed(compressed, repeats).seconds
    print(f"tokens {tokens}: plain forward+backward {base:.2f} s ({tokens / base:,.0f} tokens/s), compressed capture "
          f"{ours:.2f} s ({tokens / ours:,.0f} tokens/s), ratio {ours / base:.2f}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logra = at.LoGraAttributor(task, rank=16, show_progress=False)
        logra.cache(p.train_loader)
    sequences = timed(lambda: logra.attribute(p.train_loader, p.test_loader), repeats).seconds
    per_token = timed(lambda: logra.attribute_tokens(p.train_loader, p.test_loader), repeats).seconds
    print(f"LoGra-16 scores after cache: per sequence {sequences:.2f} s, per token {per_token:.2f} s "
          f"(ratio {per_token / sequences:.2f}; the per-token pass recaptures the training set)")


def arnoldi_cost(p: Problem, iterations: int, pairs: int, repeats: int) -> None:
    """``IFAttributorArnoldi``'s fit against ``iterations`` plain Hessian-vector products of the training loss.

    The baseline HVP is plain torch on the same batches: per batch, the gradient of its
    share of the mean loss with ``create_graph``, then the gradient of its dot product with
    ``v``, summed. Both run on the same eager-attention copy of the trained model (fused
    attention has no double backward on CPU).
    """
    model = gpt2(attention="eager")
    model.load_state_dict(p.state)
    task = at.AttributionTask(at.CausalLMLoss(model), model, p.state)
    params = {n: v.detach().clone() for n, v in model.named_parameters()}
    loaded = list(p.train_loader)
    n = sum(len(b["input_ids"]) for b in loaded)
    v = {k: torch.randn_like(x) for k, x in params.items()}

    def plain_hvp():
        total = {k: torch.zeros_like(x) for k, x in params.items()}
        for batch in loaded:
            chosen = {k: x.requires_grad_(True) for k, x in params.items()}
            loss = task.loss_func(chosen, batch) * (len(batch["input_ids"]) / n)
            grads = torch.autograd.grad(loss, list(chosen.values()), create_graph=True)
            dot = sum((g * v[k]).sum() for g, k in zip(grads, chosen))
            for k, h in zip(chosen, torch.autograd.grad(dot, list(chosen.values()))):
                total[k] += h
        return total

    one = timed(plain_hvp, repeats).seconds

    def fit():
        attributor = at.IFAttributorArnoldi(task, proj_dim=pairs, max_iter=iterations, show_progress=False)
        attributor.cache(p.train_loader)
        return attributor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seconds, _ = timed(fit, warmup=False)
    print(f"Arnoldi ({pairs} pairs from {iterations} iterations, {n} sequences): fit {seconds:.1f} s; one plain HVP "
          f"over the training set {one:.3f} s, x {iterations} = {iterations * one:.1f} s; ratio "
          f"{seconds / (iterations * one):.2f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=32)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arnoldi", action="store_true", help="IFAttributorArnoldi's fit (100 pairs from 200 "
                        "iterations) against 200 plain Hessian-vector products over the training set")
    parser.add_argument("--trak-sweep", action="store_true", help="LDS of TRAK over TRAK_SWEEP (a diagnosis: "
                        "on the reported models, not held out)")
    args = parser.parse_args(argv)
    names = [m for m in args.methods.split(",") if m]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    p = Problem(args.subsets, progress=True)
    print(f"trained (test loss {p.test_loss:.3f} nats/token) + ground truth ({args.subsets} retrained models) in "
          f"{time.perf_counter() - started:.0f} s")
    if args.throughput:
        throughput(p, args.repeats)
    if args.arnoldi:
        arnoldi_cost(p, iterations=200, pairs=100, repeats=args.repeats)
    if names:
        print("| method | LDS (95% interval) | time (s) |")
        print("|---|---|---:|")
    for name in names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seconds, scores = timed(lambda: METHODS[name](p), warmup=False)
        mean, half = lds_interval(scores, p)
        print(f"| {name} | {mean:.3f} ± {half:.3f} | {seconds:.1f} |", flush=True)
    if args.trak_sweep:
        print("\n| TRAK output | proj_dim | regularization | LDS (95% interval) |\n|---|---:|---:|---|")
        for target in TRAK_SWEEP["target"]:
            for dim in TRAK_SWEEP["proj_dim"]:
                for reg in TRAK_SWEEP["regularization"]:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        mean, half = lds_interval(_trak(dim, target, reg)(p), p)
                    print(f"| {target} | {dim} | {reg:g} | {mean:.3f} ± {half:.3f} |", flush=True)


if __name__ == "__main__":
    main()
