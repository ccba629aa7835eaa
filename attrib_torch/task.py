"""AttributionTask: the model, its loss and target functions, and its checkpoints.

The API of dattri's ``AttributionTask``, with one deliberate difference: every
loss and target function receives a batch *with* its batch dimension, and the
per-example functions derived here map over that dimension themselves (no
``unsqueeze(0)`` anywhere, and ``in_dims`` default to ``(None, 0)``).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from attrib_core import per_sample_grad, ravel, select

Checkpoint = Union[str, os.PathLike, Mapping[str, Tensor]]
LayerName = Union[None, str, Sequence[str]]

__all__ = ["AttributionTask"]


class AttributionTask:
    """What is attributed: ``loss_func``/``target_func`` of ``model`` at one or more checkpoints.

    Args:
        loss_func: ``loss_func(params, data) -> scalar``, the training loss of a batch,
            written with ``torch.func.functional_call(model, params, ...)``.
        model: the module the functions run; its weights are replaced by each checkpoint.
        checkpoints: a path, a state dict, or a list of them (a list is an ensemble).
        target_func: ``target_func(params, data) -> scalar``, what is explained on test
            data; defaults to ``loss_func``.
        checkpoints_load_func: ``(model, checkpoint) -> model`` for models with their
            own loading; by default a path is read with ``torch.load`` and the state
            dict given to ``model.load_state_dict``.

    Each checkpoint is read once and kept; switching checkpoints reloads the kept
    state into the model, not the file.

    Parameters the model marks frozen (``requires_grad=False``) are left out
    wherever ``layer_name`` is None, as dattri does; naming them in ``layer_name``
    includes them.

    Raises:
        ValueError: a checkpoint path that does not exist, or an empty list.
        TypeError: a function that is not callable, a model that is not a module.
    """

    def __init__(
        self,
        loss_func: Callable,
        model: nn.Module,
        checkpoints: Union[Checkpoint, Sequence[Checkpoint]],
        target_func: Optional[Callable] = None,
        checkpoints_load_func: Optional[Callable] = None,
    ) -> None:
        if not callable(loss_func):
            raise TypeError("loss_func: expected a callable (params, data) -> scalar")
        if target_func is not None and not callable(target_func):
            raise TypeError("target_func: expected a callable (params, data) -> scalar")
        if checkpoints_load_func is not None and not callable(checkpoints_load_func):
            raise TypeError("checkpoints_load_func: expected a callable (model, checkpoint) -> model")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        self.loss_func = loss_func
        self.target_func = target_func if target_func is not None else loss_func
        self.model = model
        self.checkpoints_load_func = checkpoints_load_func
        self.checkpoints = _checkpoint_list(checkpoints)
        self._states: Dict[int, Dict[str, Tensor]] = {}
        self._params: Dict[int, Dict[str, Tensor]] = {}
        self._current: Optional[int] = None
        self._borrows = 0
        self._user_state: Optional[Dict[str, Tensor]] = None

    # -- checkpoints -----------------------------------------------------------------

    def get_checkpoints(self) -> List[Checkpoint]:
        """The checkpoints, as given (a single one becomes a list of one)."""
        return list(self.checkpoints)

    def get_model(self) -> nn.Module:
        """The model, holding the weights of the checkpoint used last."""
        return self.model

    def __len__(self) -> int:
        return len(self.checkpoints)

    def params(self, ckpt_idx: int = 0) -> Dict[str, Tensor]:
        """``{name: tensor}`` of checkpoint ``ckpt_idx`` (detached), loading it into the model.

        The checkpoint's file is read the first time only.
        """
        self._check_index(ckpt_idx)
        if self._current != ckpt_idx:
            self._activate(ckpt_idx)
        return self._params[ckpt_idx]

    @contextlib.contextmanager
    def borrowed_model(self) -> Iterator[nn.Module]:
        """The model for the length of a ``with`` block, handed back as it was (re-entrant).

        Checkpoints loaded inside the block go into the model; on leaving it (also by
        an exception) the model's own weights and buffers, as they were on entering,
        are loaded back. Attributors run every public call inside this block.
        """
        self._borrows += 1
        try:
            yield self.model
        finally:
            self._borrows -= 1
            if self._borrows == 0 and self._user_state is not None:
                state, self._user_state = self._user_state, None
                with torch.no_grad():
                    self.model.load_state_dict(state)
                self._current = None

    def _activate(self, ckpt_idx: int) -> None:
        checkpoint = self.checkpoints[ckpt_idx]
        if ckpt_idx in self._states:
            self._load(self._states[ckpt_idx])
        elif self.checkpoints_load_func is not None:
            self._keep_user_state(None)
            loaded = self.checkpoints_load_func(self.model, checkpoint)
            if isinstance(loaded, nn.Module):
                self.model = loaded
            self._states[ckpt_idx] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            if isinstance(checkpoint, Mapping):
                # A copy: a live model.state_dict() shares storage with the parameters
                # that the next checkpoint is loaded into.
                state = {k: v.detach().clone() for k, v in checkpoint.items()}
            else:
                state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            self._load(state)
            self._states[ckpt_idx] = state
        # Copies: the next checkpoint is loaded into the same parameter tensors.
        self._params[ckpt_idx] = {k: v.detach().clone() for k, v in self.model.named_parameters()}
        self._current = ckpt_idx

    def _load(self, state: Mapping[str, Tensor]) -> None:
        self._keep_user_state(state)
        self.model.load_state_dict(state)

    def _keep_user_state(self, incoming: Optional[Mapping[str, Tensor]]) -> None:
        """Inside :meth:`borrowed_model`, copy the model's own state before the first load that changes it.

        A checkpoint equal to what the model holds (the common single checkpoint
        ``model.state_dict()``) costs a comparison, not a copy of the model.
        """
        if not self._borrows or self._user_state is not None:
            return
        current = self.model.state_dict()
        if incoming is not None and current.keys() == incoming.keys() and all(
                current[k].shape == incoming[k].shape and current[k].dtype == incoming[k].dtype
                and torch.equal(current[k], incoming[k].to(current[k].device))
                for k in current):
            return
        self._user_state = {k: v.detach().clone() for k, v in current.items()}

    def _check_index(self, ckpt_idx: int) -> None:
        if isinstance(ckpt_idx, bool) or not isinstance(ckpt_idx, int) or not 0 <= ckpt_idx < len(self.checkpoints):
            raise ValueError(f"ckpt_idx: expected an integer in [0, {len(self.checkpoints)}), got {ckpt_idx!r}")

    # -- parameters ----------------------------------------------------------------------

    def get_param(
        self,
        ckpt_idx: int = 0,
        layer_name: LayerName = None,
        layer_split: Optional[bool] = False,
        param_layer_map: Optional[List[int]] = None,
    ) -> Tuple[Union[Tensor, Tuple[Tensor, ...]], Optional[List[int]]]:
        """The flattened parameters of checkpoint ``ckpt_idx`` (those of ``layer_name`` only, if given).

        With ``layer_split``, one flat tensor per layer and the map from each
        parameter to its layer: ``param_layer_map`` if given (one entry per selected
        parameter), else parameters grouped by the module that holds them.

        Raises:
            ValueError: ``param_layer_map`` does not have one entry per parameter, or
                a name in ``layer_name`` matches no parameter.
        """
        params = self.selected(self.params(ckpt_idx), layer_name)
        flat, _ = ravel(params)
        if not layer_split:
            return flat, None
        layer_map = _layer_map(list(params), param_layer_map)
        groups: Dict[int, List[Tensor]] = {}
        for value, layer in zip(params.values(), layer_map):
            groups.setdefault(layer, []).append(value.reshape(-1))
        return tuple(torch.cat(groups[layer]) for layer in sorted(groups)), layer_map

    def selected(self, params: Mapping[str, Tensor], layer_name: LayerName) -> Dict[str, Tensor]:
        """The entries of ``params`` that ``layer_name`` names; for None, those the model does not freeze.

        Raises:
            ValueError: a name in ``layer_name`` matches no parameter.
        """
        if layer_name is None:
            trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
            if not trainable:
                raise ValueError("layer_name: None means the parameters that require gradients, and the model "
                                 "freezes all of them; name the layers to attribute to")
            return {k: v for k, v in params.items() if k in trainable}
        return select(params, layer_name)

    # -- functions -------------------------------------------------------------------------

    def get_loss_func(self, flatten: bool = True, layer_name: LayerName = None, ckpt_idx: Optional[int] = None) -> Callable:
        """``loss_func`` of flat (``flatten``) or dict parameters, restricted to ``layer_name``.

        With ``layer_name``, the function takes only those parameters; the others are
        fixed at checkpoint ``ckpt_idx`` (default 0). The model runs in eval mode during
        each call, its own mode restored after.
        """
        return self._restricted(self.loss_func, flatten, layer_name, ckpt_idx)

    def get_target_func(self, flatten: bool = True, layer_name: LayerName = None, ckpt_idx: Optional[int] = None) -> Callable:
        """``target_func`` of flat (``flatten``) or dict parameters, restricted to ``layer_name``."""
        return self._restricted(self.target_func, flatten, layer_name, ckpt_idx)

    def get_grad_loss_func(
        self, in_dims: Tuple[Optional[int], ...] = (None, 0), layer_name: LayerName = None, ckpt_idx: Optional[int] = None
    ) -> Callable:
        """``g(flat_params, data) -> (B, P)``: per-example gradients of ``loss_func``.

        ``data`` keeps its batch dimension; ``in_dims`` says which dimension of each
        argument indexes examples (``(None, 0)``: the batch's first), and each example
        keeps a batch dimension of size one at that position. The model runs in eval
        mode during the call (dattri's checkpoint loading puts it there), its own mode
        restored after; random operations left in the loss draw independently per
        example (``vmap(..., randomness="different")``, as dattri).
        """
        return per_sample_grad(self.get_loss_func(True, layer_name, ckpt_idx), in_dims=in_dims, randomness="different")

    def get_grad_target_func(
        self, in_dims: Tuple[Optional[int], ...] = (None, 0), layer_name: LayerName = None, ckpt_idx: Optional[int] = None
    ) -> Callable:
        """``g(flat_params, data) -> (B, P)``: per-example gradients of ``target_func``."""
        return per_sample_grad(self.get_target_func(True, layer_name, ckpt_idx), in_dims=in_dims, randomness="different")

    def _restricted(self, func: Callable, flatten: bool, layer_name: LayerName, ckpt_idx: Optional[int]) -> Callable:
        base = self.params(0 if ckpt_idx is None else ckpt_idx)
        chosen = self.selected(base, layer_name)
        fixed = {k: v for k, v in base.items() if k not in chosen}
        if not flatten:
            inner = func if not fixed else (lambda params, data: func({**fixed, **params}, data))
        else:
            _, unravel = ravel(chosen)
            inner = lambda flat, data: func({**fixed, **unravel(flat)}, data)  # noqa: E731
        model = self.model

        def in_eval_mode(params: Any, data: Any) -> Tensor:
            # dattri's checkpoint loading leaves the model in eval mode; here only for the call.
            modes = [(m, m.training) for m in model.modules()]
            model.eval()
            try:
                return inner(params, data)
            finally:
                for module, training in modes:
                    module.training = training

        return in_eval_mode

    # -- layer outputs ---------------------------------------------------------------------

    def register_forward_hook(self, layer_name: Union[str, Sequence[str]], ckpt_idx: int = 0) -> Callable:
        """A function ``outputs(data) -> tuple`` giving the named modules' outputs on a batch.

        Each call runs ``target_func`` on ``data`` at checkpoint ``ckpt_idx`` with
        forward hooks on the modules, removed before it returns, and gives their
        outputs in the order of ``layer_name`` (a string is one module name).

        Raises:
            ValueError: a name is not a module of the model (the valid ones are listed).
        """
        names = [layer_name] if isinstance(layer_name, str) else list(layer_name)
        modules = dict(self.model.named_modules())
        unknown = [n for n in names if n not in modules]
        if unknown:
            valid = [n for n in modules if n]
            raise ValueError(f"layer_name: {unknown} are not modules of the model; valid: {valid}")

        def outputs(data: Any) -> Tuple[Tensor, ...]:
            params = self.params(ckpt_idx)
            seen: Dict[str, Tensor] = {}

            def hook_for(name: str):
                def hook(module, args, output):
                    seen[name] = output

                return hook

            handles = [self.model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
            try:
                self.target_func(params, data)
            finally:
                for handle in handles:
                    handle.remove()
            missing = [n for n in names if n not in seen]
            if missing:
                raise ValueError(f"layer_name: {missing} did not run in the forward pass of target_func")
            return tuple(seen[n] for n in names)

        return outputs


def _checkpoint_list(checkpoints: Any) -> List[Checkpoint]:
    if isinstance(checkpoints, (str, os.PathLike, Mapping)):
        listed = [checkpoints]
    elif isinstance(checkpoints, (list, tuple)):
        listed = list(checkpoints)
    else:
        raise TypeError(
            f"checkpoints: expected a path, a state dict, or a list of them, got {type(checkpoints).__name__}"
        )
    if not listed:
        raise ValueError("checkpoints: the list is empty")
    for i, checkpoint in enumerate(listed):
        if isinstance(checkpoint, (str, os.PathLike)):
            if not os.path.exists(checkpoint):
                raise ValueError(f"checkpoints[{i}]: the file {os.fspath(checkpoint)!r} does not exist")
        elif not isinstance(checkpoint, Mapping):
            raise TypeError(f"checkpoints[{i}]: expected a path or a state dict, got {type(checkpoint).__name__}")
    return listed


def _layer_map(names: List[str], param_layer_map: Optional[List[int]]) -> List[int]:
    if param_layer_map is not None:
        if len(param_layer_map) != len(names):
            raise ValueError(
                f"param_layer_map: expected one entry per parameter ({len(names)}: {names}), "
                f"got {len(param_layer_map)}"
            )
        return list(param_layer_map)
    modules: Dict[str, int] = {}
    # A parameter's layer is the module holding it ("" for the root module).
    return [modules.setdefault(n.rsplit(".", 1)[0] if "." in n else "", len(modules)) for n in names]
