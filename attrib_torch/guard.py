"""What an attributor leaves as it found it: the user's model and torch's global random state.

Every public call of an attributor (``cache``, ``attribute``, ``self_attribute``,
``topk``) runs inside :func:`untouched`: the model in eval mode (no Dropout draws,
no BatchNorm statistics updated), checkpoints loaded into it for the call only,
and on leaving, also by an exception, every module's ``training`` flag, every
parameter's ``requires_grad``, the model's own weights and buffers and torch's
global random state as they were. A failed ``cache``, or a failed call that cached
implicitly, leaves nothing cached.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from . import solver_reports

__all__ = ["untouched", "guard_public_methods", "PUBLIC_METHODS"]

PUBLIC_METHODS = ("cache", "attribute", "self_attribute", "topk")


@contextlib.contextmanager
def untouched(task: Any = None, model: Optional[nn.Module] = None,
              device: Optional[torch.device] = None) -> Iterator[None]:
    """Run a block with ``model`` (the task's, if a task is given) in eval mode, and restore everything after.

    Args:
        task: an :class:`AttributionTask` (its model is borrowed: checkpoints loaded in
            the block are undone on leaving it), or None.
        model: the model when there is no task; None for neither.
        device: where the block computes: a model held on one other device is moved
            there for the block and back after it.
    """
    if task is not None:
        model = task.get_model()
    home = _home_device(model)
    moved = model is not None and device is not None and home is not None and home != device
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    modes = [(m, m.training) for m in model.modules()] if model is not None else []
    flags = [(p, p.requires_grad) for p in model.parameters()] if model is not None else []
    borrowed = task.borrowed_model() if task is not None else contextlib.nullcontext()
    try:
        with borrowed:
            if model is not None:
                model.eval()
            if moved:
                model.to(device)
            try:
                yield
            finally:
                if moved:
                    model.to(home)
    finally:
        for module, training in modes:
            module.training = training
        for param, flag in flags:
            param.requires_grad_(flag)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _home_device(model: Optional[nn.Module]) -> Optional[torch.device]:
    """The one device all of a model's tensors are on, or None (no tensors, or several devices)."""
    if model is None:
        return None
    devices = {t.device for t in model.parameters()} | {t.device for t in model.buffers()}
    return devices.pop() if len(devices) == 1 else None


def _guarded(method: Callable, name: str) -> Callable:
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if getattr(self, "_in_public_call", False):  # nested (attribute -> cache): the outer call guards
            return _cache_all_or_nothing(self, method, name, args, kwargs)
        self._in_public_call = True
        try:
            with untouched(getattr(self, "task", None), device=getattr(self, "device", None)):
                result = _cache_all_or_nothing(self, method, name, args, kwargs)
        except BaseException:
            solver_reports.discard(self)
            raise
        finally:
            self._in_public_call = False
        solver_reports.flush(self)  # once per public call, after it succeeded
        return result

    run.__wrapped_public__ = True
    return run


def _cache_all_or_nothing(self, method: Callable, name: str, args: tuple, kwargs: dict) -> Any:
    """Run the method; if it fails, drop what it cached (all of it for ``cache``, an implicit cache otherwise)."""
    was_cached = getattr(self, "full_train_dataloader", None) is not None
    try:
        return method(self, *args, **kwargs)
    except BaseException:
        if name == "cache" or not was_cached:
            self.clear_cache()
        raise


def _borrowing(init: Callable) -> Callable:
    """A constructor that reads checkpoints through its task hands the model back as it was."""
    @functools.wraps(init)
    def run(self, *args, **kwargs):
        task = kwargs.get("task", args[0] if args else None)
        if not hasattr(task, "borrowed_model"):
            return init(self, *args, **kwargs)
        with task.borrowed_model():
            return init(self, *args, **kwargs)

    run.__wrapped_public__ = True
    return run


def guard_public_methods(cls: type) -> None:
    """Wrap the public methods ``cls`` defines itself in :func:`untouched`, and its constructor in a borrow.

    Called by ``BaseAttributor.__init_subclass__``.
    """
    init = cls.__dict__.get("__init__")
    if init is not None and not getattr(init, "__wrapped_public__", False):
        cls.__init__ = _borrowing(init)
    for name in PUBLIC_METHODS:
        method = cls.__dict__.get(name)
        if method is not None and not getattr(method, "__wrapped_public__", False) \
                and not getattr(method, "__isabstractmethod__", False):
            setattr(cls, name, _guarded(method, name))
