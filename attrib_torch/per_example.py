"""Per-example gradients of a task's functions: ``vmap``, else module hooks (checked), else a loop.

``vmap`` is tried first. Where it cannot trace the model (Hugging Face's masks and
loss code), a function with a ``per_example(params, batch) -> (B,)`` method
(:class:`attrib_torch.lm.CausalLMLoss`) gets its gradients from module hooks in one
batched backward pass (:func:`attrib_core.hooked_grads`), once they are shown to
equal a plain loop of autograd calls on the first examples of the first batch (that
proves ``per_example`` matches the function on a batch of one and that no parameter
is read outside its module). Otherwise, or when hooks cannot cover every parameter,
each example is presented on its own in a loop, with a warning saying why.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor, nn

from attrib_core import per_sample_grad, per_sample_grad_loop
from attrib_core.hooked import HookedLayout, UncoveredParameters, hooked_grads, hooked_layout

from .data import batch_size, explained, take
from .user_warning import warn

__all__ = ["PerExampleGradients", "HEAD_EXAMPLES"]

HEAD_EXAMPLES = 2  # examples of the first batch the hooked gradients are checked on


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-4


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error) \
        or "can't allocate memory" in str(error)


class PerExampleGradients:
    """``(B, P)`` per-example gradients of ``func`` with respect to ``chosen``, the path remembered per function."""

    def __init__(self) -> None:
        self.vmap_failed = False
        self.vmap_error = ""
        self._paths: Dict[str, Any] = {}  # function name -> HookedLayout, or "loop"

    def __call__(self, model: nn.Module, func: Callable, fixed: Dict[str, Tensor], chosen: Dict[str, Tensor],
                 data: Any, name: str) -> Tensor:
        restricted = (lambda c, d: func({**fixed, **c}, d))
        if not self.vmap_failed:
            try:
                # torch's shape checks fail as these under vmap: the loss's own error, explained if we can
                with explained(restricted, chosen, data, name, kinds=(ValueError, IndexError, TypeError,
                                                                     AssertionError)):
                    return per_sample_grad(restricted)(chosen, data)
            except RuntimeError as error:
                if _out_of_memory(error):
                    raise
                self.vmap_error = str(error).splitlines()[0][:200]
        path = self._paths.get(name)
        if isinstance(path, HookedLayout):
            return hooked_grads(model, func.per_example, {**fixed, **chosen}, data, path).to(
                next(iter(chosen.values())).dtype)
        if path == "loop":
            return per_sample_grad_loop(restricted)(chosen, data)
        with explained(restricted, chosen, data, name):  # the loop fails too: the user's error
            head = take(data, slice(0, min(HEAD_EXAMPLES, batch_size(data))))
            looped_head = per_sample_grad_loop(restricted)(chosen, head)
        self.vmap_failed = True
        layout, grads, why = _checked_hooks(model, func, fixed, chosen, data, looped_head)
        if layout is not None:
            self._paths[name] = layout
            return grads
        self._paths[name] = "loop"
        warn(f"torch.func.vmap cannot trace the model ({self.vmap_error}); {why}: computing per-example gradients "
             "in a loop instead (slower, same result)")
        return per_sample_grad_loop(restricted)(chosen, data)


def _checked_hooks(model: nn.Module, func: Callable, fixed: Dict[str, Tensor], chosen: Dict[str, Tensor],
                   data: Any, looped_head: Tensor) -> tuple[Optional[HookedLayout], Optional[Tensor], str]:
    """``(layout, the batch's gradients, "")`` from hooks if they match the loop on the batch's head, else
    ``(None, None, why not)``."""
    per_example = getattr(func, "per_example", None)
    if not callable(per_example):
        return None, None, ("it has no per_example(params, batch) method (one loss per example) for gradients from "
                      "module hooks")
    try:
        layout = hooked_layout(model, list(chosen))
    except UncoveredParameters as error:
        return None, None, str(error)
    try:
        grads = hooked_grads(model, per_example, {**fixed, **chosen}, data, layout)
    except ValueError as error:  # a module run twice (shared layers), misshapen per-example losses
        return None, None, f"its gradients cannot come from module hooks ({str(error)[:200]})"
    head = grads[: looped_head.shape[0]].to(looped_head.dtype)
    error = float(torch.linalg.vector_norm(head - looped_head))
    scale = float(torch.linalg.vector_norm(looped_head))
    if not error <= _tolerance(looped_head.dtype) * max(scale, 1e-30):
        return None, None, (f"its gradients from module hooks differ from autograd's on the first examples "
                      f"(relative error {error / max(scale, 1e-30):.1e}): per_example does not match the "
                      "function on a batch of one, or the model reads a weight outside its module")
    return layout, grads.to(looped_head.dtype), ""
