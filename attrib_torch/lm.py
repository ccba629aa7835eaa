"""Loss and target functions for Hugging Face models and dict batches (``input_ids``, ``attention_mask``, ``labels``).

``CausalLMLoss(model)`` is a ``loss_func`` for :class:`AttributionTask`: called on a
batch it returns the mean over the batch's sequences of each sequence's loss, and
its :meth:`~CausalLMLoss.per_example` returns those per-sequence losses ``(B,)``.
A sequence's loss is exactly Hugging Face's ``.loss`` for a batch holding that
sequence alone (its token mean), so attributions follow the data convention even
though HF's own batch loss averages over all tokens of the batch. Attributors use
``per_example`` where ``vmap`` cannot trace the model: per-example gradients then
come from module hooks in one batched backward pass
(:func:`attrib_core.hooked_grads`).

:class:`QueryTokens` turns a dataset of query sequences into one query per scored
token, so any attributor gives per-query-token scores.

Nothing here imports ``transformers``: the model is any module that takes
``input_ids``/``attention_mask`` keywords and returns ``.logits`` (or a tensor).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import Dataset

from attrib_core import lm
from attrib_core._checks import check_reduction

__all__ = ["CausalLMLoss", "SequenceClassificationLoss", "QueryTokens"]

_TARGETS = ("loss", "margin")


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")


def _logits(output: Any) -> Tensor:
    logits = output if isinstance(output, Tensor) else getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if not isinstance(logits, Tensor):
        raise TypeError(f"model: expected an output with .logits or a tensor, got {type(output).__name__}")
    return logits


def _positions_limit(model: nn.Module) -> Optional[int]:
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


class _DictBatchLoss:
    """Shared checks of a dict batch and the model call (keyword inputs, no labels passed to the model)."""

    inputs = ("input_ids", "attention_mask", "token_type_ids", "position_ids")

    def __init__(self, model: nn.Module) -> None:
        _check_model(model)
        self.model = model
        self.max_positions = _positions_limit(model)

    def _check_batch(self, batch: Any) -> None:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError("batch: expected a dict with 'input_ids' (and 'attention_mask', 'labels'), got "
                            f"{type(batch).__name__}" + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping)
                                                        else ""))
        ids = batch["input_ids"]
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            raise ValueError(f"batch['input_ids']: expected a (B, T) tensor, got "
                             f"{tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__}")
        if self.max_positions is not None and ids.shape[1] > self.max_positions:
            raise ValueError(f"batch['input_ids']: sequences of {ids.shape[1]} tokens, longer than the model's "
                             f"{self.max_positions} positions")

    def logits(self, params: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        kwargs = {k: batch[k] for k in self.inputs if k in batch}
        return _logits(functional_call(self.model, dict(params), args=(), kwargs=kwargs))


class CausalLMLoss(_DictBatchLoss):
    """Next-token loss (or margin) of a causal language model, per sequence.

    Args:
        model: the language model (``model(input_ids=..., attention_mask=...)`` with ``.logits``).
        reduction: how a sequence's token values combine: ``"mean"`` over its scored
            tokens (Hugging Face's ``.loss`` for a batch of one) or ``"sum"``.
        target: ``"loss"`` (cross-entropy) or ``"margin"`` (``log p/(1-p)`` of each
            label, TRAK's output function per token); a margin is a target to explain,
            not a training loss.

    Labels are ``batch["labels"]`` (``-100`` not scored), or the input ids with the
    positions ``attention_mask`` marks as padding set to ``-100``. Raises, before the
    model runs: a batch that is not a dict with ``input_ids``, sequences longer than
    the model's positions, labels scored at positions the attention mask marks as
    padding (a pad id that is not masked), and (on the logits) a sequence with no
    scored token.
    """

    def __init__(self, model: nn.Module, reduction: str = "mean", target: str = "loss") -> None:
        super().__init__(model)
        check_reduction(reduction)
        if target not in _TARGETS:
            raise ValueError(f"target: expected one of {_TARGETS}, got {target!r}")
        self.reduction = reduction
        self.target = target

    def labels(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The labels scored, ``(B, T)``, checked against the attention mask."""
        self._check_batch(batch)
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        labels = batch.get("labels")
        if labels is None:
            labels = lm.default_labels(ids, mask)
        elif labels.shape != ids.shape:
            raise ValueError(f"batch['labels']: expected the shape {tuple(ids.shape)} of input_ids, got "
                             f"{tuple(labels.shape)}")
        if mask is not None:
            scored_pad = (~mask.bool()) & (labels != lm.IGNORE_INDEX)
            rows = scored_pad.any(dim=1).nonzero().flatten()
            if len(rows):
                raise ValueError(f"batch['labels']: examples {rows.tolist()[:8]} score tokens where attention_mask "
                                 "is 0 (padding); set their labels to -100")
        return labels

    def per_example(self, params: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        """``(B,)``: each sequence's loss (or margin) as a batch of one would have it."""
        labels = self.labels(batch)
        values = lm.sequence_margins if self.target == "margin" else lm.sequence_losses
        return values(self.logits(params, batch), labels, reduction=self.reduction)

    def per_token(self, params: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(values, valid)``: each scored token's loss (or margin) ``(B, T - 1)`` and where tokens are scored."""
        labels = self.labels(batch)
        values = lm.token_margins if self.target == "margin" else lm.token_losses
        return values(self.logits(params, batch), labels)

    def probabilities(self, params: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        """``(B,)``: each sequence's mean probability of its scored labels (TRAK's ``correct_probability_func``:
        its ``1 - p`` weighs each sequence's margin gradient, averaged over the tokens)."""
        labels = self.labels(batch)
        losses, valid = lm.token_losses(self.logits(params, batch), labels)
        return torch.where(valid, torch.exp(-losses), torch.zeros_like(losses)).sum(1) / valid.sum(1)

    def __call__(self, params: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        """The batch's loss: the mean of :meth:`per_example` (for a batch of one, HF's ``.loss``)."""
        return self.per_example(params, batch).mean()


class SequenceClassificationLoss(_DictBatchLoss):
    """Cross-entropy of a sequence classifier (``batch["labels"]`` of shape ``(B,)``), per sequence."""

    def per_example(self, params: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        self._check_batch(batch)
        labels = batch.get("labels")
        if not isinstance(labels, Tensor) or labels.shape != batch["input_ids"].shape[:1]:
            raise ValueError("batch['labels']: expected one class per sequence, shape (B,)")
        logits = self.logits(params, batch)
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return nn.functional.cross_entropy(wide, labels, reduction="none")

    def __call__(self, params: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        return self.per_example(params, batch).mean()


class QueryTokens(Dataset):
    """One query per scored token of each sequence of ``dataset``: targets per query token.

    Item ``j`` is sequence ``index[j, 0]`` of ``dataset`` with every label but the one at
    position ``index[j, 1]`` set to ``-100``, so a :class:`CausalLMLoss` target is that
    token's loss (or margin) alone, given the whole sequence as context; any attributor
    then scores each training example against each query token (columns
    ``offsets[i] : offsets[i + 1]`` are sequence ``i``'s tokens). With ``reduction="sum"``
    a sequence's token columns add up to its own column wherever scores are linear in
    the target's gradient (Grad-Dot, influence functions, LoGra). Each query token costs
    one forward and backward pass of its sequence.

    Args:
        dataset: a map-style dataset of dict examples (``input_ids``, optionally
            ``attention_mask`` and ``labels``, each ``(T,)``), as a DataLoader over
            it would batch them.

    Raises:
        TypeError / ValueError: an item that is not such a dict, or a sequence with no
            scored token (named).
    """

    def __init__(self, dataset: Any) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"dataset: expected a map-style dataset of dict examples, got {type(dataset).__name__}")
        self.dataset = dataset
        rows, positions, counts = [], [], []
        for i in range(len(dataset)):
            scored = lm.scored_positions(self._labels(i))
            if not len(scored):
                raise ValueError(f"dataset: sequence {i} has no scored token (every label is -100 after the shift)")
            rows.append(torch.full_like(scored, i))
            positions.append(scored)
            counts.append(len(scored))
        self.index = torch.stack([torch.cat(rows), torch.cat(positions)], dim=1) if rows else \
            torch.zeros(0, 2, dtype=torch.long)
        self.offsets = torch.zeros(len(counts) + 1, dtype=torch.long)
        self.offsets[1:] = torch.tensor(counts, dtype=torch.long).cumsum(0)

    def _item(self, i: int) -> Mapping[str, Tensor]:
        item = self.dataset[i]
        if not isinstance(item, Mapping) or not isinstance(item.get("input_ids"), Tensor) or \
                item["input_ids"].dim() != 1:
            raise TypeError(f"dataset[{i}]: expected a dict with a (T,) tensor 'input_ids', got "
                            f"{type(item).__name__}" + (f" with keys {sorted(item)}" if isinstance(item, Mapping)
                                                        else ""))
        return item

    def _labels(self, i: int) -> Tensor:
        item = self._item(i)
        labels = item.get("labels")
        return lm.default_labels(item["input_ids"], item.get("attention_mask")) if labels is None else labels

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, j: int) -> dict:
        i, position = (int(v) for v in self.index[j])
        return {**self._item(i), "labels": lm.one_token_labels(self._labels(i), position)}
