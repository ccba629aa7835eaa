"""Captum-compatible layer feature ablation over :mod:`attrib_core.ablation`.

:class:`LayerFeatureAblation` has captum's constructor and ``attribute``
signature (``captum.attr.LayerFeatureAblation``). It runs the model once to
read the layer's value, then hands :func:`attrib_core.ablation.ablate` a
forward that overrides the layer through a temporary hook.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from attrib_core.ablation import ablate, prepare_ablation

__all__ = ["LayerFeatureAblation"]

TensorOrTuple = Union[Tensor, Tuple[Tensor, ...]]
TargetType = Union[None, int, Tuple[int, ...], Tensor, List[Any]]


class LayerFeatureAblation:
    """Attribute a model's output to a layer's neurons by replacing them with a baseline.

    Each group of neurons of the layer's output (or input) is replaced by the
    baseline in turn; every neuron of the group is attributed the drop in the
    target output, ``f(x) - f(x with the group ablated)``, per example. By
    default every neuron is its own group.

    Args:
        forward_func: the model, or any callable ``forward_func(*inputs,
            *additional_forward_args) -> (B, ...)``.
        layer: the module whose output (or input) is ablated. It must run once
            per forward pass.
        device_ids: accepted for captum compatibility; a model split over
            several devices (``nn.DataParallel``) is not supported.

    Raises:
        TypeError: ``forward_func`` is not callable or ``layer`` is not an ``nn.Module``.
        ValueError: ``forward_func`` is an ``nn.Module`` and ``layer`` is not one of
            its submodules, or more than one device is named.

    Example::

        ablator = LayerFeatureAblation(net, net.conv1)  # conv1 output: (N, 12, 3, 3)
        attr = ablator.attribute(x, target=1)  # (N, 12, 3, 3), 108 groups
        rows = torch.tensor([[[0, 0, 0], [1, 1, 1], [2, 2, 2]]])  # (1, 3, 3): one group per row
        attr = ablator.attribute(x, target=1, layer_mask=rows)
    """

    def __init__(self, forward_func: Callable[..., Tensor], layer: nn.Module,
                 device_ids: Optional[List[int]] = None) -> None:
        if not callable(forward_func):
            raise TypeError(f"forward_func: expected a callable, got {type(forward_func).__name__}")
        if not isinstance(layer, nn.Module):
            raise TypeError(f"layer: expected an nn.Module, got {type(layer).__name__}")
        if isinstance(forward_func, nn.Module) and not any(m is layer for m in forward_func.modules()):
            raise ValueError(f"layer: the {type(layer).__name__} is not a submodule of forward_func")
        devices = device_ids if device_ids is not None else getattr(forward_func, "device_ids", None)
        if devices is not None and len(devices) > 1:
            raise ValueError(
                f"device_ids: a model on several devices ({list(devices)}) is not supported; "
                f"pass the wrapped module as forward_func"
            )
        self.forward_func = forward_func
        self.layer = layer
        self.device_ids = device_ids

    def attribute(
        self,
        inputs: TensorOrTuple,
        layer_baselines: Union[None, int, float, Tensor, Tuple[Union[int, float, Tensor], ...]] = None,
        target: TargetType = None,
        additional_forward_args: Any = None,
        layer_mask: Union[None, Tensor, Tuple[Tensor, ...]] = None,
        attribute_to_layer_input: bool = False,
        perturbations_per_eval: int = 1,
    ) -> TensorOrTuple:
        """Ablation attributions of the layer's neurons.

        Args:
            inputs: a ``(B, ...)`` tensor or a tuple of them, the model's leading arguments.
            layer_baselines: the replacement values: a number or a tensor
                broadcastable to the layer's value (a tuple, one per tensor, for a
                layer with several); ``None`` means zero.
            target: which output value to attribute, per example: ``None`` (the
                model returns one value per example, ``(B,)`` or ``(B, 1)``), an
                int or an integer tensor of one element (a column of a
                ``(B, C)`` output), a tuple of ints (an index into ``output[b]``
                of a higher-dimensional output), or a list (one int or tuple per
                example) or a ``(B,)`` integer tensor (one column per example).
            additional_forward_args: passed after ``inputs``: one argument, or a
                tuple of them. With ``perturbations_per_eval > 1``, tensors whose
                leading dimension is ``B`` are repeated along it, like ``inputs``.
            layer_mask: integer group ids broadcastable to the layer's value (a
                tuple, one per tensor, for a layer with several); neurons with the
                same id are ablated together. ``None``: each neuron alone.
            attribute_to_layer_input: ablate the layer's input (through a forward
                pre-hook) instead of its output (through a forward hook).
            perturbations_per_eval: groups ablated in one forward pass of
                ``perturbations_per_eval · B`` examples.

        Returns:
            Attributions of the layer's output (or input) shape: a tensor, or a
            tuple of tensors when the layer has several outputs (inputs).

        Raises:
            TypeError: ``inputs`` are not tensors, the layer's value or the
                model's output is not made of tensors, ``target`` or ``layer_mask``
                has the wrong type.
            ValueError: ``layer`` does not run exactly once or its value's
                leading dimension is not ``B``, ``target`` does not fit the output,
                ``layer_mask`` or ``layer_baselines`` does not broadcast,
                ``perturbations_per_eval < 1``. All before the first ablation.
        """
        inputs = _as_inputs(inputs)
        extra = _as_args(additional_forward_args)
        batch = inputs[0].shape[0]
        with torch.no_grad():
            layer_value, output = self._capture(inputs, extra, attribute_to_layer_input)
        index = _target_index(target, output, batch)
        ablation = prepare_ablation(
            layer_value, mask=layer_mask, baseline=layer_baselines,
            mask_name="layer_mask", baseline_name="layer_baselines",
        )

        def forward_with_layer(value: TensorOrTuple) -> Tensor:
            rows = (value[0] if isinstance(value, tuple) else value).shape[0]
            copies = rows // batch
            out = self._run(_repeat(inputs, copies, batch), _repeat(extra, copies, batch),
                            attribute_to_layer_input, lambda _: value)
            return _select(out, index, copies)

        attributions = ablate(forward_with_layer, ablation, perturbations_per_eval=perturbations_per_eval)
        return attributions if len(attributions) > 1 else attributions[0]

    def _run(self, inputs: tuple, extra: tuple, to_input: bool, on_layer: Callable[[Any], Any]) -> Any:
        """Run the model with ``on_layer(value)`` hooked on the layer's input or output; the hook is always removed."""
        if to_input:
            handle = self.layer.register_forward_pre_hook(lambda module, args: on_layer(args))
        else:
            handle = self.layer.register_forward_hook(lambda module, args, out: on_layer(out))
        try:
            return self.forward_func(*inputs, *extra)
        finally:
            handle.remove()

    def _capture(self, inputs: tuple, extra: tuple, to_input: bool) -> Tuple[TensorOrTuple, Tensor]:
        """The layer's value in an unablated forward pass, and the model's output."""
        seen: list = []

        def record(value: Any) -> None:
            seen.append(_copy(value))  # an in-place operation later in the model must not change it

        output = self._run(inputs, extra, to_input, record)
        where = "input" if to_input else "output"
        if len(seen) != 1:
            raise ValueError(f"layer: ran {len(seen)} times in a forward pass of forward_func; expected once")
        value = seen[0]
        parts = value if isinstance(value, tuple) else (value,)
        if not parts or not all(isinstance(p, Tensor) for p in parts):
            raise TypeError(f"layer: its {where} must be a tensor or a tuple of tensors")
        batch = inputs[0].shape[0]
        if any(p.dim() == 0 or p.shape[0] != batch for p in parts):
            raise ValueError(
                f"layer: its {where} has shapes {[tuple(p.shape) for p in parts]}, "
                f"whose leading dimension is not the batch size {batch} of inputs"
            )
        if not isinstance(output, Tensor):
            raise TypeError(f"forward_func: expected a tensor output, got {type(output).__name__}")
        return value, output


def _as_inputs(inputs: Any) -> Tuple[Tensor, ...]:
    parts = inputs if isinstance(inputs, tuple) else (inputs,)
    if not parts or not all(isinstance(p, Tensor) for p in parts):
        raise TypeError("inputs: expected a tensor or a non-empty tuple of tensors")
    if any(p.dim() == 0 or p.shape[0] != parts[0].shape[0] for p in parts):
        raise ValueError(f"inputs: expected tensors with the same leading batch dimension, got "
                         f"shapes {[tuple(p.shape) for p in parts]}")
    return parts


def _copy(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_copy(v) for v in value)
    return value.clone() if isinstance(value, Tensor) else value


def _as_args(args: Any) -> tuple:
    if args is None:
        return ()
    return args if isinstance(args, tuple) else (args,)


def _repeat(args: tuple, copies: int, batch: int) -> tuple:
    """``args`` for ``copies · batch`` examples: batch-first tensors repeated along dimension 0."""
    if copies == 1:
        return args
    return tuple(
        torch.cat([a] * copies) if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == batch else a
        for a in args
    )


def _target_index(target: TargetType, output: Tensor, batch: int) -> Optional[Tensor]:
    """``target`` as per-example indices into ``output[b]``, ``(B, output.dim() - 1)``; None for no target."""
    shape = tuple(output.shape)
    if output.dim() == 0 or shape[0] != batch:
        raise ValueError(f"forward_func: expected an output of leading dimension B={batch}, got shape {shape}")
    if target is None:
        if output.numel() != batch:
            raise ValueError(
                f"target: None needs one output value per example, shape ({batch},) or ({batch}, 1); got {shape}"
            )
        return None
    rows = _target_rows(target, batch)
    if len({len(r) for r in rows}) > 1:
        raise ValueError(f"target: the per-example index tuples differ in length: {target!r}")
    index = torch.tensor(rows, dtype=torch.long).reshape(batch, len(rows[0]))
    sizes = torch.tensor(shape[1:], dtype=torch.long)
    if index.shape[1] != len(sizes):
        raise ValueError(
            f"target: {target!r} indexes {index.shape[1]} dimension(s) after the batch; the output of shape "
            f"{shape} has {len(sizes)}"
        )
    if bool(((index < -sizes) | (index >= sizes)).any()):
        raise ValueError(f"target: {target!r} is out of range for an output of shape {shape}")
    return index


def _target_rows(target: Any, batch: int) -> List[Tuple[int, ...]]:
    """One index tuple per example, from any of captum's target forms."""
    if isinstance(target, Tensor):
        if target.dtype == torch.bool or target.dtype.is_floating_point or target.dtype.is_complex:
            raise TypeError(f"target: expected an integer tensor, got dtype {target.dtype}")
        if target.numel() == 1:
            return [(int(target.item()),)] * batch
        if target.dim() != 1 or len(target) != batch:
            raise ValueError(f"target: a tensor must have 1 or B={batch} elements, got shape {tuple(target.shape)}")
        return [(int(t),) for t in target.tolist()]
    if isinstance(target, list):
        if len(target) != batch:
            raise ValueError(f"target: a list needs one entry per example (B={batch}), got {len(target)}")
        return [_index_tuple(t) for t in target]
    return [_index_tuple(target)] * batch


def _index_tuple(t: Any) -> Tuple[int, ...]:
    entries = t if isinstance(t, tuple) else (t,)
    if not all(isinstance(e, numbers.Integral) and not isinstance(e, bool) for e in entries):
        raise TypeError(f"target: expected an int, a tuple of ints, a list of them or a tensor, got {t!r}")
    return tuple(int(e) for e in entries)


def _select(output: Tensor, index: Optional[Tensor], copies: int) -> Tensor:
    """Each row's target value, ``(copies · B,)``; ``index`` holds the indices of the first ``B`` rows."""
    if index is None:
        return output.reshape(-1)
    index = index.repeat(copies, 1).to(output.device)
    rows = torch.arange(len(index), device=output.device)
    return output[(rows, *index.unbind(1))]
