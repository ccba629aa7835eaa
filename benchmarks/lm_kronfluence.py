"""kronfluence's EK-FAC beside ours on the language-model benchmark's exact inputs (when kronfluence is installed).

    PYTHONPATH=.:<kronfluence on the path> python -m benchmarks.lm_kronfluence [--subsets 32]

kronfluence tracks ``nn.Linear`` and ``nn.Conv2d`` only, so it gets a copy of the
trained GPT-2 with every ``Conv1D`` replaced by the ``nn.Linear`` it computes (as its
own GPT-2 example does). Its training loss is the sum over a batch's sequences of
each sequence's mean token loss (our ``CausalLMLoss`` times the batch size: the same
per-example gradients), with the empirical Fisher (ours has no sampled Fisher for LM
batches) and its damping heuristic (0.1 times the mean eigenvalue per layer, as our
``damping="heuristic"``); its measurement is each test sequence's mean token loss.
Both attribute the same model, state and loaders; LDS against the same retrained
models as ``benchmarks.lm``. kronfluence is never a dependency.
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
import warnings

import torch
from torch import nn

import attrib_torch as at

from .lm import Problem, lds_interval


def linear_twin(model: nn.Module) -> nn.Module:
    """A copy with every Hugging Face ``Conv1D`` replaced by the equal ``nn.Linear`` (weight transposed)."""
    from transformers.pytorch_utils import Conv1D

    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, Conv1D):
            d_in, d_out = module.weight.shape
            linear = nn.Linear(d_in, d_out).to(module.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                linear.bias.copy_(module.bias)
            twin.set_submodule(name, linear)
    return twin


def untied(model: nn.Module) -> nn.Module:
    """A copy whose output layer holds its own copy of the weight it shares with the input embedding: the same
    function, attributed with the two uses as separate parameters (what kronfluence's per-module hooks see)."""
    copy_ = copy.deepcopy(model)
    copy_.config.tie_word_embeddings = False
    copy_.lm_head.weight = nn.Parameter(copy_.lm_head.weight.detach().clone())
    return copy_


def kronfluence_ekfac(p: Problem) -> torch.Tensor:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    from attrib_core import lm

    def per_sequence(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return lm.sequence_losses(logits, batch["labels"])

    class SequenceLoss(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return per_sequence(model, batch).sum()

        def compute_measurement(self, batch, model):
            return per_sequence(model, batch).sum()

    p.model.load_state_dict(p.state)
    model = prepare_model(linear_twin(p.model), SequenceLoss())
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
    score_args = ScoreArguments(damping_factor=None)
    logging.getLogger("kronfluence").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="kronfluence-") as output, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analyzer = Analyzer("lm", model, SequenceLoss(), cpu=True, disable_tqdm=True, output_dir=output)
        analyzer.fit_all_factors("factors", p.train_loader.dataset, per_device_batch_size=p.train_loader.batch_size,
                                 factor_args=factor_args, overwrite_output_dir=True)
        analyzer.compute_pairwise_scores("scores", "factors", p.test_loader.dataset, p.train_loader.dataset,
                                         per_device_query_batch_size=p.test_loader.batch_size,
                                         per_device_train_batch_size=p.train_loader.batch_size,
                                         score_args=score_args, overwrite_output_dir=True)
        return analyzer.load_pairwise_scores("scores")["all_modules"].T.contiguous()


def ours_ekfac(p: Problem, model: nn.Module, linear_only: bool = False) -> torch.Tensor:
    """Our EK-FAC on ``model``: every layer it can factor, or (``linear_only``) the ``nn.Linear`` layers kronfluence
    tracks."""
    task = at.AttributionTask(at.CausalLMLoss(model), model, {k: v for k, v in model.state_dict().items()})
    modules = [n for n, m in model.named_modules() if type(m) is nn.Linear] if linear_only else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attributor = at.IFAttributorEKFAC(task, module_name=modules, damping="heuristic", show_progress=False)
    attributor.cache(p.train_loader)
    return attributor.attribute(p.train_loader, p.test_loader)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=32)
    args = parser.parse_args(argv)
    p = Problem(args.subsets, progress=False)
    p.model.load_state_dict(p.state)
    twin = linear_twin(p.model)
    print("| EK-FAC | model | LDS (95% interval) | time (s) |\n|---|---|---|---:|")
    runs = (("ours", "GPT-2 as built (Conv1D)", lambda: ours_ekfac(p, p.model)),
            ("ours", "Conv1D converted to Linear", lambda: ours_ekfac(p, twin)),
            ("ours", "Conv1D converted to Linear, lm_head untied", lambda: ours_ekfac(p, untied(twin))),
            ("ours", "the same, its nn.Linear layers only (kronfluence's)",
             lambda: ours_ekfac(p, untied(twin), linear_only=True)),
            ("kronfluence 1.0.1", "Conv1D converted to Linear", lambda: kronfluence_ekfac(p)))
    for who, model, run in runs:
        start = time.perf_counter()
        scores = run()
        seconds = time.perf_counter() - start
        mean, half = lds_interval(scores, p)
        print(f"| {who} | {model} | {mean:.3f} ± {half:.3f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
