"""Training-time capture's overhead: the same training with and without a GradientRecorder, side by side.

    python -m benchmarks.training_capture [--repeats 3] [--epochs 1]

Three trainings, each timed plain and recorded in the same process (runs alternate,
median of ``--repeats`` after one untimed round; every run starts from the same weights
and data order):

- the scale benchmark's MLP (64-1024-1024-10, tanh) on 8,192 noisy digits, SGD in
  batches of 64, a hand-written loop;
- the language-model benchmark's GPT-2 (3 layers, 64 wide, byte vocabulary) on its 512
  training paragraphs, Adam in batches of 16, a hand-written loop over ``model(**batch).loss``;
- the same GPT-2 through a Hugging Face ``Trainer``, with the recorder's callback.

Recorded: LoGra's compression at rank 16 per side (every linear, Conv1D and embedding
layer), rows stored as float16, one segment per epoch, in a temporary directory. The
table gives seconds, the recorded/plain ratio, rows and MB written, and whether the
recorded training ended at bit-identical weights.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional

import torch
from torch import nn

RANK = 16


def _hand_loop(n: int, epochs: int, batch: int, loss: Callable, optimizer: Callable) -> Callable:
    """``run(model, recorder)``: ``epochs`` epochs over ``n`` examples in seeded random batches of ``batch`` rows,
    ``loss(model, indices)`` backpropagated, ``optimizer(parameters)`` stepping; a recorder (if any) records every
    step before the update and closes a segment per epoch."""
    orders = [torch.randperm(n, generator=torch.Generator().manual_seed(e)) for e in range(epochs)]

    def run(model: nn.Module, recorder) -> None:
        step = optimizer(model.parameters())
        for order in orders:
            for idx in order.split(batch):
                loss(model, idx).backward()
                if recorder is not None:
                    recorder.step(idx, lr=step.param_groups[0]["lr"])
                step.step()
                step.zero_grad()
            if recorder is not None:
                recorder.checkpoint()

    return run


def _mlp_training(epochs: int):
    from .scale import tiled_digits

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1024), nn.Tanh(), nn.Linear(1024, 1024), nn.Tanh(), nn.Linear(1024, 10))
    x, y = tiled_digits(8192, seed=1)
    run = _hand_loop(len(x), epochs, 64, lambda m, idx: nn.functional.cross_entropy(m(x[idx]), y[idx]),
                     lambda params: torch.optim.SGD(params, lr=0.05))
    return model.train(), run


def _lm_training(epochs: int):
    from .lm_data import batch_of, gpt2, load_corpus

    corpus = load_corpus()
    ids, mask = corpus.train_ids, corpus.train_mask
    run = _hand_loop(len(ids), epochs, 16, lambda m, idx: m(**batch_of(ids[idx], mask[idx])).loss,
                     lambda params: torch.optim.Adam(params, lr=1e-3))
    return gpt2().train(), run


def _trainer_training(epochs: int):
    from transformers import Trainer, TrainingArguments

    from .lm_data import batch_of, gpt2, load_corpus

    corpus = load_corpus()
    model = gpt2()

    class Paragraphs(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(corpus.train_ids)

        def __getitem__(self, i: int) -> dict:
            row = batch_of(corpus.train_ids[i : i + 1], corpus.train_mask[i : i + 1])
            return {**{k: v[0] for k, v in row.items()}, "index": i}

    def run(model: nn.Module, recorder) -> None:
        with tempfile.TemporaryDirectory() as out:
            args = TrainingArguments(output_dir=out, per_device_train_batch_size=16, num_train_epochs=epochs,
                                     learning_rate=1e-3, report_to=[], save_strategy="no", logging_strategy="no",
                                     remove_unused_columns=False, seed=0, use_cpu=True, max_grad_norm=0.0,
                                     disable_tqdm=True)
            callbacks = [] if recorder is None else [recorder.trainer_callback()]
            Trainer(model=model, args=args, train_dataset=Paragraphs(), callbacks=callbacks).train()

    return model.train(), run


def _side_by_side(name: str, setup: Callable, epochs: int, repeats: int) -> str:
    import warnings

    from attrib_torch import FeatureStore, GradientRecorder

    base, run = setup(epochs)
    times = {"plain": [], "recorded": []}
    weights, written = {}, (0, 0)
    for repeat in range(repeats + 1):  # the first round is a warm-up, not timed
        for mode in ("plain", "recorded"):
            model = copy.deepcopy(base)
            with tempfile.TemporaryDirectory() as tmp:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the layers left out (LayerNorms), named once
                    recorder = None if mode == "plain" else GradientRecorder(model, Path(tmp) / "g", rank=RANK,
                                                                             dtype="float16")
                hand_loop = setup is not _trainer_training
                start = time.perf_counter()
                with recorder if (recorder is not None and hand_loop) else contextlib.nullcontext():
                    run(model, recorder)
                if repeat:
                    times[mode].append(time.perf_counter() - start)
                if recorder is not None:
                    stores = [FeatureStore.open(p, verify=False) for p in recorder.segments]
                    written = (sum(s.n_rows for s in stores),
                               sum((p / "part-00000.npy").stat().st_size for p in recorder.segments) / 1e6)
            weights[mode] = [p.detach().clone() for p in model.parameters()]
    plain, recorded = (sorted(times[m])[len(times[m]) // 2] for m in ("plain", "recorded"))
    same = all(torch.equal(a, b) for a, b in zip(weights["plain"], weights["recorded"]))
    return (f"| {name} | {plain:.2f} | {recorded:.2f} | {recorded / plain:.2f} | {written[0]:,} | "
            f"{written[1]:.1f} | {same} |")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args(argv)
    print(f"\nGradientRecorder (LoGra rank {RANK}, float16 rows), {args.epochs} epoch(s), median of {args.repeats}, "
          f"{torch.get_num_threads()} threads\n")
    print("| training | plain (s) | recorded (s) | ratio | rows written | MB written | same final weights |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, setup in (("digits MLP, SGD, batches of 64 (hand loop)", _mlp_training),
                        ("GPT-2 (LM benchmark), Adam, batches of 16 (hand loop)", _lm_training),
                        ("GPT-2 (LM benchmark), Hugging Face Trainer, batches of 16", _trainer_training)):
        print(_side_by_side(name, setup, args.epochs, args.repeats), flush=True)


if __name__ == "__main__":
    main()
