"""Losses and targets of language models as pure functions of logits and labels.

A causal language model predicts token ``t + 1`` from tokens ``0..t``: the logits
at position ``t`` are scored against the label at ``t + 1`` (Hugging Face's
convention: ``labels`` are the input ids, shifted here), and a label of
``ignore_index`` (-100) is not scored. Per-example values are what an example's
gradient is taken of under the data convention (an example's loss is the loss of
a batch of one), so they never depend on the other sequences of the batch.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._checks import check_reduction

__all__ = ["IGNORE_INDEX", "token_losses", "sequence_losses", "token_margins", "sequence_margins", "scored_positions",
           "one_token_labels", "default_labels"]

IGNORE_INDEX = -100


def _shifted(logits: Tensor, labels: Tensor, shift: bool) -> tuple[Tensor, Tensor]:
    if logits.dim() != 3:
        raise ValueError(f"logits: expected (B, T, V), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels: expected shape {tuple(logits.shape[:2])} (B, T), got {tuple(labels.shape)}")
    if shift:
        return logits[:, :-1], labels[:, 1:]
    return logits, labels


def _valid(labels: Tensor, ignore_index: int) -> Tensor:
    valid = labels != ignore_index
    empty = (~valid).all(dim=1).nonzero().flatten()
    if len(empty):
        raise ValueError(f"labels: examples {empty.tolist()[:8]} of the batch have no scored token (every label "
                         f"is {ignore_index} after the shift), so they have no loss to attribute")
    return valid


def token_losses(logits: Tensor, labels: Tensor, *, shift: bool = True,
                 ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """``(losses, valid)``: each token's cross-entropy ``(B, T')`` (0 where not scored) and where it is scored.

    ``T' = T - 1`` with ``shift`` (causal LM: position ``t`` predicts label ``t + 1``),
    ``T`` without (a masked LM or a token classifier). Computed in float32 or wider.

    Raises:
        ValueError: misshapen inputs, or an example without any scored token (named).
    """
    logits, labels = _shifted(logits, labels, shift)
    valid = _valid(labels, ignore_index)
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logp = torch.log_softmax(wide, dim=-1)
    picked = logp.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, -picked, torch.zeros_like(picked)), valid


def sequence_losses(logits: Tensor, labels: Tensor, *, reduction: str = "mean", shift: bool = True,
                    ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``(B,)``: each sequence's token loss, averaged over its scored tokens (``"mean"``) or summed (``"sum"``).

    ``"mean"`` is what Hugging Face's ``.loss`` is for a batch of one sequence.
    """
    check_reduction(reduction)
    losses, valid = token_losses(logits, labels, shift=shift, ignore_index=ignore_index)
    total = losses.sum(dim=1)
    return total / valid.sum(dim=1) if reduction == "mean" else total


def token_margins(logits: Tensor, labels: Tensor, *, shift: bool = True,
                  ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """``(margins, valid)``: each token's ``log p / (1 - p)`` of its label ``(B, T')`` (0 where not scored).

    TRAK's margin for a classifier, per token: ``logit_y - logsumexp_{v != y} logit_v``.
    """
    logits, labels = _shifted(logits, labels, shift)
    valid = _valid(labels, ignore_index)
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    index = torch.where(valid, labels, 0).unsqueeze(-1)
    correct = wide.gather(-1, index).squeeze(-1)
    others = wide.scatter(-1, index, float("-inf")).logsumexp(dim=-1)
    return torch.where(valid, correct - others, torch.zeros_like(correct)), valid


def sequence_margins(logits: Tensor, labels: Tensor, *, reduction: str = "sum", shift: bool = True,
                     ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``(B,)``: each sequence's token margins, summed (``"sum"``) or averaged over its scored tokens."""
    check_reduction(reduction)
    margins, valid = token_margins(logits, labels, shift=shift, ignore_index=ignore_index)
    total = margins.sum(dim=1)
    return total / valid.sum(dim=1) if reduction == "mean" else total


def default_labels(ids: Tensor, mask: Optional[Tensor] = None, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The labels of a batch given none: its input ids, with ``ignore_index`` where ``mask`` marks padding."""
    if mask is None:
        return ids
    return torch.where(mask.bool(), ids, torch.full_like(ids, ignore_index))


def scored_positions(labels: Tensor, *, shift: bool = True, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The positions of one sequence's ``labels`` ``(T,)`` that are scored, ascending.

    With ``shift`` (a causal LM) position 0 is never scored: no logits predict it.
    """
    if labels.dim() != 1:
        raise ValueError(f"labels: expected one sequence's (T,) labels, got shape {tuple(labels.shape)}")
    valid = labels != ignore_index
    if shift:
        valid[:1] = False
    return valid.nonzero().flatten()


def one_token_labels(labels: Tensor, position: int, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``labels`` with every position but ``position`` set to ``ignore_index``: the target of that token alone."""
    out = torch.full_like(labels, ignore_index)
    out[..., position] = labels[..., position]
    return out
