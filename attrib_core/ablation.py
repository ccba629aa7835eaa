"""Feature ablation of a layer's neurons, as a pure function of a forward pass with the layer overridden.

Ablating a group ``g`` of a layer's neurons replaces their values ``a_g`` by a
baseline ``b_g`` and runs the rest of the model again. The group's attribution
is the drop in the target output, per example,

    attr_g = f(a) - f(a with a_g := b_g),

and every neuron of the group receives it. This is occlusion (Zeiler & Fergus,
"Visualizing and Understanding Convolutional Networks", ECCV 2014) applied to
hidden units: the quantity captum's ``LayerFeatureAblation`` computes.

The caller supplies ``forward_with_layer(value) -> (n,)``: the model run with
the layer's value overridden. To ablate ``k`` groups in one call,
:func:`ablate` stacks ``k`` ablated copies of the ``(B, ...)`` layer value
along the batch dimension, so ``n = k · B`` and the caller repeats the model's
own inputs ``k`` times to match.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._checks import check_callable, check_count

__all__ = ["Ablation", "prepare_ablation", "ablate", "layer_ablation"]

LayerValue = Union[Tensor, Tuple[Tensor, ...]]


class Ablation(NamedTuple):
    """A layer's value, its neurons' groups and their replacement values, one entry per tensor of the layer.

    Attributes:
        values: the layer's tensors, each ``(B, ...)`` with the same ``B``.
        groups: each tensor's group ids, integer tensors of the tensors' shapes;
            groups are ablated one at a time, tensor by tensor.
        baselines: the replacement values, each broadcastable to its tensor.
        is_tuple: whether ``forward_with_layer`` takes a tuple of tensors (else
            the single tensor ``values[0]``).
    """

    values: Tuple[Tensor, ...]
    groups: Tuple[Tensor, ...]
    baselines: Tuple[Tensor, ...]
    is_tuple: bool


def prepare_ablation(
    layer_value: LayerValue,
    *,
    mask: Union[None, Tensor, Sequence[Optional[Tensor]]] = None,
    baseline: Any = 0.0,
    mask_name: str = "mask",
    baseline_name: str = "baseline",
) -> Ablation:
    """Check and group a layer value for :func:`ablate`.

    Args:
        layer_value: a ``(B, ...)`` tensor, or a tuple of them (a layer with
            several inputs or outputs), all with the same batch size ``B``.
        mask: integer group ids broadcastable to the layer value (a
            ``(1, ...)`` mask groups every example alike, a ``(B, ...)`` one per
            example); ``None`` makes every neuron (every entry of ``value[b]``)
            its own group. For a tuple, a tuple with one entry per tensor, or one
            value used for all of them.
        baseline: the replacement value: a number, or a tensor broadcastable to
            the layer value; ``None`` means zero. For a tuple, as for ``mask``.
        mask_name: the argument name used in error messages about ``mask``.
        baseline_name: the argument name used in error messages about ``baseline``.

    Returns:
        The :class:`Ablation`; baselines are cast to their tensors' dtype and device.

    Raises:
        TypeError: the layer value is not a tensor or a tuple of tensors, a mask
            is not an integer tensor, a baseline is neither a number nor a tensor.
        ValueError: a tensor has no batch dimension or no elements, the batch
            sizes differ, a mask or baseline does not broadcast to its tensor, a
            tuple of masks or baselines has the wrong length.
    """
    values = _layer_tensors(layer_value)
    names = ("",) if len(values) == 1 else tuple(f"[{i}]" for i in range(len(values)))
    masks = _per_tensor(mask, len(values), mask_name)
    baselines = _per_tensor(baseline, len(values), baseline_name)
    return Ablation(
        values,
        tuple(_group_ids(v, m, mask_name + n) for v, m, n in zip(values, masks, names)),
        tuple(_baseline(v, b, baseline_name + n) for v, b, n in zip(values, baselines, names)),
        isinstance(layer_value, tuple),
    )


def ablate(
    forward_with_layer: Callable[[LayerValue], Tensor],
    ablation: Ablation,
    *,
    perturbations_per_eval: int = 1,
) -> Tuple[Tensor, ...]:
    """Attribute the target output to each neuron by ablating its group.

    Args:
        forward_with_layer: ``value -> (n,)``, the target output of every row
            when the layer's value is overridden by ``value`` (a tensor or a
            tuple, as in ``ablation.is_tuple``), whose ``n = k · B`` rows are
            ``k`` stacked copies of the ``(B, ...)`` layer value. Each call gets
            fresh tensors, which it may modify in place.
        ablation: from :func:`prepare_ablation`.
        perturbations_per_eval: at most this many groups are ablated in one call
            of ``forward_with_layer``; the result does not depend on it when the
            model treats its examples independently.

    Returns:
        One attribution per layer tensor, of that tensor's shape:
        ``attr[b, ...] = f(a)[b] - f(a with the group of that neuron ablated)[b]``,
        in the output's dtype promoted to at least float32. Computed without autograd.

    Raises:
        TypeError: ``forward_with_layer`` is not callable, ``perturbations_per_eval``
            is not an integer.
        ValueError: ``perturbations_per_eval < 1``; ``forward_with_layer`` does
            not return one value per row (checked on its first call, before any ablation).
    """
    check_callable(forward_with_layer, "forward_with_layer")
    per_eval = check_count(perturbations_per_eval, "perturbations_per_eval")
    with torch.no_grad():
        fresh = tuple(v.clone() for v in ablation.values)  # the forward may modify its argument in place
        reference = _evaluate(forward_with_layer, ablation, fresh, 1)[0]
        return tuple(
            _ablate_tensor(forward_with_layer, ablation, j, reference, per_eval)
            for j in range(len(ablation.values))
        )


def layer_ablation(
    forward_with_layer: Callable[[LayerValue], Tensor],
    layer_value: LayerValue,
    *,
    mask: Union[None, Tensor, Sequence[Optional[Tensor]]] = None,
    baseline: Any = 0.0,
    perturbations_per_eval: int = 1,
) -> LayerValue:
    """Ablation attributions of a layer's neurons: :func:`prepare_ablation` then :func:`ablate`.

    Args:
        forward_with_layer: ``value -> (k · B,)``; see :func:`ablate`.
        layer_value: the layer's unablated ``(B, ...)`` tensor or tuple of tensors.
        mask: group ids; see :func:`prepare_ablation`.
        baseline: replacement values; see :func:`prepare_ablation`.
        perturbations_per_eval: groups ablated per call of ``forward_with_layer``.

    Returns:
        Attributions shaped like ``layer_value`` (a tensor, or a tuple of them).

    Raises:
        TypeError, ValueError: as :func:`prepare_ablation` and :func:`ablate`.
    """
    attributions = ablate(
        forward_with_layer,
        prepare_ablation(layer_value, mask=mask, baseline=baseline),
        perturbations_per_eval=perturbations_per_eval,
    )
    return attributions if isinstance(layer_value, tuple) else attributions[0]


def _ablate_tensor(forward: Callable, ablation: Ablation, j: int, reference: Tensor, per_eval: int) -> Tensor:
    """The attributions of tensor ``j``: ``(G, B)`` drops, one per group, spread over the group's neurons."""
    value, groups, baseline = ablation.values[j], ablation.groups[j], ablation.baselines[j]
    ids, inverse = torch.unique(groups, return_inverse=True)
    drops = []
    for chunk in ids.split(per_eval):
        copies = [_replace(ablation.values, j, torch.where(groups == g, baseline, value)) for g in chunk]
        stacked = tuple(torch.cat(parts) for parts in zip(*copies))
        drops.append(reference - _evaluate(forward, ablation, stacked, len(chunk)))
    batch = value.shape[0]
    return torch.cat(drops).T.gather(1, inverse.reshape(batch, -1)).reshape(value.shape)


def _replace(values: Tuple[Tensor, ...], j: int, new: Tensor) -> Tuple[Tensor, ...]:
    return values[:j] + (new,) + values[j + 1 :]


def _evaluate(forward: Callable, ablation: Ablation, parts: Tuple[Tensor, ...], copies: int) -> Tensor:
    """Run ``forward`` on ``copies`` stacked layer values: ``(copies, B)``, at least float32."""
    batch = ablation.values[0].shape[0]
    out = forward(parts if ablation.is_tuple else parts[0])
    rows = copies * batch
    if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != rows or out.numel() != rows:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"forward_with_layer: expected one target value per row of the layer value, shape ({rows},), got {got}"
        )
    return out.reshape(copies, batch).to(torch.promote_types(out.dtype, torch.float32))


def _layer_tensors(layer_value: Any) -> Tuple[Tensor, ...]:
    values = layer_value if isinstance(layer_value, tuple) else (layer_value,)
    if not values or not all(isinstance(v, Tensor) for v in values):
        raise TypeError(
            f"layer_value: expected a tensor or a non-empty tuple of tensors, got {_describe(layer_value)}"
        )
    for i, v in enumerate(values):
        if v.dim() == 0 or v.numel() == 0:
            raise ValueError(
                f"layer_value: tensor {i} must have a batch dimension and elements, got shape {tuple(v.shape)}"
            )
    batches = {v.shape[0] for v in values}
    if len(batches) > 1:
        raise ValueError(f"layer_value: the tensors' batch sizes differ: {[v.shape[0] for v in values]}")
    return values


def _per_tensor(arg: Any, count: int, name: str) -> Tuple[Any, ...]:
    """One entry per layer tensor: a tuple or list of ``count`` entries, or one value repeated."""
    if isinstance(arg, (tuple, list)):
        if len(arg) != count:
            raise ValueError(f"{name}: got {len(arg)} entries for a layer value of {count} tensor(s)")
        return tuple(arg)
    return (arg,) * count


def _group_ids(value: Tensor, mask: Optional[Tensor], name: str) -> Tensor:
    if mask is None:
        neurons = value[0].numel()
        return torch.arange(neurons, device=value.device).reshape(value.shape[1:]).expand(value.shape)
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name}: expected an integer tensor of group ids, got {type(mask).__name__}")
    if mask.dtype == torch.bool or mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"{name}: expected an integer tensor of group ids, got dtype {mask.dtype}")
    _check_broadcasts(mask, value, name)
    return mask.to(value.device).expand(value.shape)


def _baseline(value: Tensor, baseline: Any, name: str) -> Tensor:
    if baseline is None:
        baseline = 0.0
    if isinstance(baseline, numbers.Real) and not isinstance(baseline, bool):
        return torch.tensor(baseline, dtype=value.dtype, device=value.device)
    if not isinstance(baseline, Tensor):
        raise TypeError(f"{name}: expected a number or a tensor, got {type(baseline).__name__}")
    _check_broadcasts(baseline, value, name)
    return baseline.to(device=value.device, dtype=value.dtype)


def _check_broadcasts(t: Tensor, value: Tensor, name: str) -> None:
    try:
        shape = torch.broadcast_shapes(t.shape, value.shape)
    except RuntimeError:
        shape = None
    if shape != value.shape:
        raise ValueError(
            f"{name}: shape {tuple(t.shape)} does not broadcast to the layer value's shape {tuple(value.shape)}"
        )


def _describe(x: Any) -> str:
    if isinstance(x, tuple):
        return f"a tuple of ({', '.join(type(v).__name__ for v in x)})"
    return type(x).__name__
