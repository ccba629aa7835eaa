"""dattri's LoGra and FactGraSS beside ours on the language-model benchmark's exact inputs (when dattri is installed).

    PYTHONPATH=.:<dattri on the path> python -m benchmarks.lm_dattri [--subsets 32] [--rank 16]

dattri's compressed-gradient attributors hook ``nn.Linear`` modules only, so they get
a copy of the trained GPT-2 with every ``Conv1D`` replaced by the ``nn.Linear`` it
computes (:func:`benchmarks.lm_kronfluence.linear_twin`); they hook the output layer
but not the input embedding it is tied to, so ours is run beside them on the same
copy with the output layer untied and the same ``nn.Linear`` layers, and on the
model as built with its default coverage. Rank ``k`` per side is dattri's
``proj_dim = k²`` (LoGra: one Gaussian matrix per side; FactGraSS: ``blowup_factor``
4, so each side is masked to ``2k`` coordinates and the Kronecker product sketched to
``k²``). dattri's training loss is the sum of the batch's per-sequence mean token
losses (the same per-example gradients as our ``CausalLMLoss``); its test gradients
are Hugging Face's ``.loss`` of the test batch, which differs from each sequence's
mean token loss by a positive factor per test sequence, so LDS (a rank correlation per
test sequence) is unchanged. dattri's damping is ``damping ×`` the mean eigenvalue of
each layer's compressed Fisher (default ``1e-5``), ours ``0.1 ×``: both are run at
both. dattri's TRAK takes per-example gradients with ``vmap`` only; it is tried on the
model as built and reported with the error it raises where it cannot trace it. dattri
is never a dependency.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from typing import Callable, List

import torch
from torch import nn

import attrib_torch as at
from attrib_core import lm

from .lm import Problem, lds_interval
from .lm_kronfluence import linear_twin, untied


def linear_modules(model: nn.Module) -> List[str]:
    """The ``nn.Linear`` modules dattri's hooks attach to by default."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def dattri_scores(p: Problem, kind: str, rank: int, damping: float) -> torch.Tensor:
    """dattri's ``LoGraAttributor`` (``kind="logra"``) or ``FactGraSSAttributor`` on the Linear twin."""
    from dattri.algorithm.factgrass import FactGraSSAttributor
    from dattri.algorithm.logra import LoGraAttributor
    from dattri.task import AttributionTask

    def loss(model, batch, device):
        inputs = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        return lm.sequence_losses(logits, inputs["labels"]).sum()

    p.model.load_state_dict(p.state)
    twin = linear_twin(p.model)
    task = AttributionTask(loss_func=loss, model=twin, checkpoints=twin.state_dict())
    cls = LoGraAttributor if kind == "logra" else FactGraSSAttributor
    logging.getLogger("dattri").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="dattri-") as scratch:  # its metadata file, never the checkout
        attributor = cls(task, layer_names=linear_modules(twin), hessian="eFIM", damping=damping,
                         proj_dim=rank * rank, offload="none", cache_dir=scratch)
        attributor.cache(p.train_loader)
        return attributor.attribute(p.train_loader, p.test_loader)


def dattri_trak(p: Problem, proj_dim: int = 512) -> torch.Tensor:
    """dattri's ``TRAKAttributor`` with each sequence's mean token loss as the loss and ``exp(-loss)`` as its
    probability (TRAK's ``Q = 1 - p``), gradients by ``vmap`` over single sequences."""
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask
    from torch.func import functional_call

    p.model.load_state_dict(p.state)
    model = p.model

    def loss(params, example):
        inputs = {"input_ids": example["input_ids"][None], "attention_mask": example["attention_mask"][None]}
        logits = functional_call(model, params, (), inputs).logits
        return lm.sequence_losses(logits, example["labels"][None])[0]

    def probability(params, example):
        return torch.exp(-loss(params, example))

    task = AttributionTask(loss_func=loss, model=model, checkpoints=p.state)
    attributor = TRAKAttributor(task, probability, projector_kwargs={"proj_dim": proj_dim, "device": "cpu"},
                                device="cpu")
    attributor.cache(p.train_loader)
    return attributor.attribute(p.test_loader)


def ours_scores(p: Problem, kind: str, rank: int, damping: float, like_dattri: bool) -> torch.Tensor:
    """Our ``LoGraAttributor`` on the model as built (default coverage) or, ``like_dattri``, on the untied Linear twin
    with the same layers as dattri."""
    p.model.load_state_dict(p.state)
    model = untied(linear_twin(p.model)) if like_dattri else p.model
    task = at.AttributionTask(at.CausalLMLoss(model), model, {k: v.clone() for k, v in model.state_dict().items()})
    attributor = at.LoGraAttributor(task, rank=rank, kind=kind, damping=damping,
                                    module_name=linear_modules(model) if like_dattri else None, show_progress=False)
    return attributor.attribute(p.train_loader, p.test_loader)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    p = Problem(args.subsets, progress=False)
    k = args.rank
    print("| method | who | layers | damping | LDS (95% interval) | time (s) |\n|---|---|---|---:|---|---:|")
    runs: List[tuple] = []
    for kind, label in (("logra", f"LoGra-{k}"), ("factgrass", f"FactGraSS-{k}")):
        for damping in (1e-5, 0.1):
            runs.append((label, "dattri 0.3.0", "nn.Linear (twin)", damping,
                         lambda kind=kind, d=damping: dattri_scores(p, kind, k, d)))
            runs.append((label, "ours", "nn.Linear (twin, untied)", damping,
                         lambda kind=kind, d=damping: ours_scores(p, kind, k, d, like_dattri=True)))
        runs.append((label, "ours", "default (as built)", 0.1,
                     lambda kind=kind: ours_scores(p, kind, k, 0.1, like_dattri=False)))
    runs.append(("TRAK-512", "dattri 0.3.0", "all (as built)", 0.0, lambda: dattri_trak(p)))
    for label, who, layers, damping, run in runs:
        run: Callable[[], torch.Tensor]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            try:
                scores = run()
            except RuntimeError as error:  # dattri's vmap on a model it cannot trace
                message = str(error)
                reason = ("vmap: data-dependent control flow (Hugging Face's mask code)"
                          if "data-dependent control flow" in message else message[:120])
                print(f"| {label} | {who} | {layers} | {damping:g} | fails: {reason} | |")
                continue
            seconds = time.perf_counter() - start
        mean, half = lds_interval(scores, p)
        print(f"| {label} | {who} | {layers} | {damping:g} | {mean:.3f} ± {half:.3f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
