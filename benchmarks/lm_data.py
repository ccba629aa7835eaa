"""English text that ships with Python, as byte-level token sequences, and a GPT-2-shaped model trained on it.

The corpus is the paragraphs of ``pydoc_data.topics`` (the language reference's
help topics, part of every CPython install): whitespace collapsed, paragraphs of
at least 32 bytes kept and cut to 64, duplicates removed, shuffled with a fixed
seed. Tokens are the UTF-8 bytes (ids 1..255; 0 is padding, which the text never
contains), right-padded with attention masks. Nothing is downloaded; the model
comes from a ``GPT2Config``.
"""

from __future__ import annotations

import re
from typing import Mapping, NamedTuple, Optional

import torch
from torch import Tensor, nn

PAD = 0
LENGTH = 64
MIN_BYTES = 32


class Corpus(NamedTuple):
    """Token ids ``(n, LENGTH)`` and attention masks ``(n, LENGTH)`` of the training and test sequences."""

    train_ids: Tensor
    train_mask: Tensor
    test_ids: Tensor
    test_mask: Tensor


def paragraphs() -> list[bytes]:
    """The corpus's distinct paragraphs as UTF-8 bytes, at most ``LENGTH`` each, in a fixed order."""
    from pydoc_data.topics import topics

    seen, out = set(), []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            text = " ".join(block.split()).encode("utf-8")[:LENGTH]
            if len(text) >= MIN_BYTES and b"\x00" not in text and text not in seen:
                seen.add(text)
                out.append(text)
    return out


def _encode(texts: list[bytes]) -> tuple[Tensor, Tensor]:
    ids = torch.full((len(texts), LENGTH), PAD, dtype=torch.long)
    for i, text in enumerate(texts):
        ids[i, : len(text)] = torch.tensor(list(text), dtype=torch.long)
    return ids, (ids != PAD).long()


def load_corpus(n_train: int = 512, n_test: int = 64, *, seed: int = 0) -> Corpus:
    """A seeded split of the paragraphs into ``n_train`` training and ``n_test`` test sequences."""
    texts = paragraphs()
    if n_train + n_test > len(texts):
        raise ValueError(f"n_train + n_test: the corpus has {len(texts)} paragraphs, asked for {n_train + n_test}")
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    train_ids, train_mask = _encode([texts[i] for i in order[:n_train]])
    test_ids, test_mask = _encode([texts[i] for i in order[n_train : n_train + n_test]])
    return Corpus(train_ids, train_mask, test_ids, test_mask)


def batch_of(ids: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """The Hugging Face dict batch: padding positions get label -100."""
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)}


def gpt2(*, seed: int = 0, n_embd: int = 64, n_layer: int = 3, n_head: int = 4,
         attention: Optional[str] = None) -> nn.Module:
    """A GPT-2 from its config over the 256 byte values (about 170k parameters at the defaults), eval mode.

    ``attention`` is the config's attention implementation (``"eager"`` for Hessian
    products: torch's fused attention has no double backward on CPU); None for the default.
    """
    import transformers

    config = transformers.GPT2Config(vocab_size=256, n_positions=LENGTH, n_embd=n_embd, n_layer=n_layer,
                                     n_head=n_head, bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if attention is not None:
        config._attn_implementation = attention
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


class Trained(NamedTuple):
    """The fitted state dict (copies) and the optimizer's state dict (Adam's moments, for TrackStar)."""

    state: dict
    optimizer: dict


def train(model: nn.Module, ids: Tensor, mask: Tensor, *, steps: int = 60, lr: float = 1.5e-2,
          chunk: int = 64) -> Trained:
    """Fit ``model`` (in place) by full-batch Adam on the sequences' mean loss, ``steps`` steps, the learning rate
    decaying linearly to zero.

    Full-batch and deterministic: the model is a smooth function of which sequences
    it is trained on, with no data-order noise (mini-batch training's order noise
    swamped the effect of the data on this corpus: retrained with another order, the
    test losses' ranking over subsets did not correlate). The gradient is summed over
    chunks of ``chunk`` sequences (the same mean, less memory traffic).
    """
    from attrib_torch.lm import CausalLMLoss

    loss = CausalLMLoss(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    params = dict(model.named_parameters())
    for _ in range(steps):
        optimizer.zero_grad()
        for start in range(0, len(ids), chunk):
            part = slice(start, start + chunk)
            n = len(ids[part])
            (loss(params, batch_of(ids[part], mask[part])) * (n / len(ids))).backward()
        optimizer.step()
        schedule.step()
    return Trained({k: v.detach().clone() for k, v in model.state_dict().items()}, optimizer.state_dict())


def test_losses(model: nn.Module, state: Mapping[str, Tensor], ids: Tensor, mask: Tensor) -> Tensor:
    """``(n,)``: each test sequence's mean token loss under ``state``."""
    from attrib_torch.lm import CausalLMLoss

    model.load_state_dict(state)
    with torch.no_grad():
        return CausalLMLoss(model).per_example(dict(model.named_parameters()), batch_of(ids, mask))
