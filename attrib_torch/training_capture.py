"""Training-time capture: each training step's per-example gradients, compressed as LoGra compresses them, from
the training loop's own forward and backward passes, written into stores.

Hooks on the compressed layers keep each layer's input during the forward pass and
its output gradient during the backward pass; :meth:`GradientRecorder.step` turns
them into one row per example: the example's share of the gradient the optimizer is
about to apply (``Σ_t ds_t a_tᵀ`` of the batch loss's backward, per example, compressed
on both sides), whatever the loss normalises by, so a step's rows add up to its
compressed batch gradient. No extra forward or backward pass runs, and the training is
unchanged: the hooks read tensors and return them as they were.

A recording is a directory of segments, one store each (``segment-00000``, ...),
closed by :meth:`GradientRecorder.checkpoint` (every epoch, or at each of a Hugging
Face Trainer's saves): rows in the order trained, with the columns ``index`` (the
dataset row, -1 where the loop did not say), ``step`` and ``lr``, and the fingerprint
of the model's state at the close, the checkpoint whose query gradients pair with
them. :func:`attribute_recorded` scores test examples against every segment, TracIn
over checkpoints without a pass over the training data:
``score(i, q) = Σ_segments Σ_{rows r of example i} lr_r ⟨row_r, g̃_q(checkpoint)⟩``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from attrib_core import (
    compress_factors,
    compress_parameter_gradients,
    compressed_gradients,
    compression,
    coverage,
    embedding_input_maps,
    layer_factors,
    layer_specs,
)
from attrib_core.layer_capture import layer_input

from .task import LayerName
from .user_warning import warn

__all__ = ["GradientRecorder", "attribute_recorded"]

_COLUMNS = {"index": "int64", "step": "int64", "lr": "float64", "scale": "float64"}


class _Pass:
    """One forward pass's inputs and output gradients of the recorded layers."""

    def __init__(self, examples: int) -> None:
        self.examples = examples
        self.inputs: Dict[str, Tensor] = {}
        self.outputs: Dict[str, tuple] = {}  # shape, dtype, device
        self.grads: Dict[str, Tensor] = {}


class GradientRecorder:
    """Record compressed per-example gradients of a training loop's batches into stores, as it trains.

    A context manager for hand-written loops::

        with GradientRecorder(model, "runs/grads", rank=16) as recorder:
            for epoch in range(epochs):
                for indices, (x, y) in loader:
                    loss = loss_fn(model(x), y)
                    loss.backward()
                    recorder.step(indices, lr=optimizer.param_groups[0]["lr"])  # before the update
                    optimizer.step(); optimizer.zero_grad()
                recorder.checkpoint()  # one store per epoch, paired with the weights now

    and a Hugging Face ``TrainerCallback`` (:meth:`trainer_callback`).

    Args:
        model: the model being trained; its compressed layers are chosen as
            :class:`LoGraAttributor` chooses them (``module_name``, or every ``nn.Linear``,
            ``nn.Conv2d``, ``nn.Embedding`` and Conv1D holding trainable weights), with the
            same compression for the same ``rank``, ``kind`` and ``seed``, so a
            ``LoGraAttributor`` with those arguments computes the query gradients.
        path: a new directory for the segments.
        dtype: of the stored rows.

    Each forward pass with gradients enabled is recorded (several per step under
    gradient accumulation); passes without gradients (evaluation) are not. A layer
    run twice in one pass (activation checkpointing recomputes the forward pass) is
    refused. Nothing is kept between steps but the rows being written.
    """

    def __init__(self, model: nn.Module, path: Union[str, Path], *, rank: Union[int, tuple] = 16,
                 module_name: LayerName = None, kind: str = "logra", seed: int = 0, dtype: str = "float32") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        self.model, self.path = model, Path(path)
        if self.path.exists() and any(self.path.iterdir()):
            raise ValueError(f"path: {self.path} is not empty; record into a new directory")
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise RuntimeError("GradientRecorder: not under torch.distributed yet (every rank would write the same "
                               "segments, and DDP averages the ranks' gradients the hooks see one of); record in a "
                               "single process")
        from .store import STORE_DTYPES

        if dtype not in STORE_DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(STORE_DTYPES)}, got {dtype!r}")
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self._specs = layer_specs(model, trainable, module_name, tied=True, one_hot=False)
        if module_name is None:
            left = coverage(model, trainable, self._specs)
            if left.left_out:
                warn(f"GradientRecorder: {left.describe()}; recording the {len(left.covered)} parameters of "
                     f"{len(self._specs)} compressed layers only")
        self._tracked = {s.weight for s in self._specs} | {s.bias for s in self._specs if s.bias}  # parameter names
        self.compression, _ = compression(self._specs, rank, kind=kind, seed=seed)
        self._input_maps = embedding_input_maps(self._specs, self.compression)
        self._modules = dict(model.named_modules(remove_duplicate=False))
        self.dtype = dtype
        self.segments: List[Path] = []  # closed segments, in order
        self._writer: Any = None
        self._passes: List[_Pass] = []
        self._handles: list = []
        self._steps = 0
        self._pending_indices: List[Tensor] = []  # from batches that carried them (the Trainer callback)
        self._index_key: Optional[str] = None
        self._warned_no_index = False

    # -- the description a LoGraAttributor with the same arguments also has ---------------------------------

    def description(self) -> Dict[str, Any]:
        return {"method": "recorded training gradients", **self.compression.description(),
                "parameters": sorted(self._tracked)}

    # -- hooks ---------------------------------------------------------------------------------------

    def __enter__(self) -> "GradientRecorder":
        if self._handles:
            raise RuntimeError("GradientRecorder: already recording")
        self._handles.append(self.model.register_forward_pre_hook(self._begin_pass, with_kwargs=True))
        for spec in self._specs:
            self._handles.append(self._modules[spec.module].register_forward_hook(self._layer_hook(spec.module),
                                                                                  with_kwargs=True))
        return self

    def __exit__(self, kind, value, traceback) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if kind is None:
            if self._passes:
                raise RuntimeError("GradientRecorder: forward passes since the last step() were not recorded; "
                                   "call step() after each backward pass")
            if self._writer is not None:
                self.checkpoint()
        elif self._writer is not None:
            self._writer.abandon()  # the segment being written stays unfinished on disk
            self._writer = None

    def _begin_pass(self, module: nn.Module, args: tuple, kwargs: dict):
        if self._index_key is not None and self._index_key in kwargs:
            kwargs = dict(kwargs)
            indices = torch.as_tensor(kwargs.pop(self._index_key)).reshape(-1).cpu()  # never for the model
            if torch.is_grad_enabled():  # an evaluation pass's indices are not a training step's
                self._pending_indices.append(indices)
            self._pending_pass(args, kwargs)
            return args, kwargs
        self._pending_pass(args, kwargs)
        return None

    def _pending_pass(self, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled():
            # the batch size: the largest leading dimension of the model's tensor inputs (a (1, T) position_ids
            # passed first must not make the batch one example)
            sizes = [t.shape[0] for t in pytree.tree_leaves((args, kwargs))
                     if isinstance(t, Tensor) and t.dim()]
            if not sizes:
                raise RuntimeError("GradientRecorder: the model was called without a tensor with a batch dimension")
            self._passes.append(_Pass(max(sizes)))

    def _layer_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Optional[Tensor]:
            if not self._passes or not torch.is_grad_enabled() or not output.requires_grad:
                return None  # evaluation, or a pass this recorder does not see
            current = self._passes[-1]
            if name in current.inputs:
                raise RuntimeError(f"GradientRecorder: layer {name!r} ran twice in one forward pass (shared "
                                   "weights, or activation checkpointing recomputing it): its per-example "
                                   "gradients cannot be told apart; leave it out with module_name")
            x = layer_input(name, args, kwargs).detach()
            shared = output.dim() > 1 and output.shape[0] == 1 and current.examples > 1
            if shared:  # one output row for the whole batch
                if not isinstance(module, nn.Embedding):
                    raise RuntimeError(f"GradientRecorder: layer {name!r} computes one output row for the whole "
                                       "batch; its per-example gradients are not in the backward pass (leave it "
                                       "out with module_name)")
                # a position embedding of (1, T) ids, added to every example: giving each its own row broadcasts
                # to the same sum
                x = x.expand(current.examples, *x.shape[1:])
                output = output.expand(current.examples, *output.shape[1:])
            current.inputs[name] = x
            current.outputs[name] = (tuple(output.shape), output.dtype, output.device)

            def keep(grad: Tensor) -> None:  # several backward passes through one forward pass add up
                held = current.grads.get(name)
                current.grads[name] = grad.detach() if held is None else held + grad.detach()

            output.register_hook(keep)
            return output if shared else None

        return hook

    # -- recording -----------------------------------------------------------------------------------

    def step(self, indices: Optional[Sequence[int]] = None, lr: Optional[float] = None, *,
             check_grads: bool = False) -> int:
        """Record the forward and backward passes since the last call (one training step): one row per example.

        Call after the backward pass(es) and before the optimizer changes the weights.
        ``indices``: the dataset rows of the step's examples, in batch order (-1 where
        unknown); ``lr``: the learning rate of the update (recorded per row; 1 if None).
        ``check_grads``: compare the rows' sum with the compressed ``.grad`` of the recorded
        parameters (this step's only: zero them between steps), after any clipping; the
        factor between them (gradient-norm clipping scales the whole gradient) is
        recorded as the rows' ``scale`` (1 otherwise), and a ``.grad`` that is not the
        backward pass's gradient times one factor is refused. Returns the rows written.
        """
        passes, self._passes = self._passes, []
        if not passes:
            raise RuntimeError("GradientRecorder.step: no forward pass with gradients since the last step")
        stray = [i for i, p in enumerate(passes) if p.inputs and not p.grads]
        if stray:
            self._pending_indices = []
            raise RuntimeError(f"GradientRecorder.step: {len(stray)} of the {len(passes)} forward passes since the "
                               "last step had no backward pass (an evaluation with gradients enabled?); run "
                               "evaluation under torch.no_grad(), or step() before it")
        if self._index_key is not None and not self._pending_indices and not self._warned_no_index:
            self._warned_no_index = True
            warn(f"GradientRecorder: the batches carry no {self._index_key!r} entry, so rows get index -1 (give the "
                 "dataset that column and TrainingArguments(remove_unused_columns=False))")
        rows = torch.cat([self._rows(p) for p in passes])
        n = len(rows)
        if indices is None and self._pending_indices:
            indices = torch.cat(self._pending_indices)
        self._pending_indices = []
        index = torch.full((n,), -1, dtype=torch.long) if indices is None else torch.as_tensor(indices).long().cpu()
        if tuple(index.shape) != (n,):
            raise ValueError(f"indices: expected one per example of the step ({n}), got {tuple(index.shape)}")
        lr = 1.0 if lr is None else float(lr)
        scale = self._applied_scale(rows.sum(0)) if check_grads else 1.0
        if self._writer is None:
            self._open_segment(rows.shape[1])
        self._writer.append(rows, index=index, step=torch.full((n,), self._steps, dtype=torch.long),
                            lr=torch.full((n,), lr, dtype=torch.float64),
                            scale=torch.full((n,), scale, dtype=torch.float64))
        self._steps += 1
        return n

    def _applied_scale(self, total: Tensor) -> float:
        """The factor ``c`` with ``compress(.grad) = c · total`` (``total`` the step's rows added up), or a
        RuntimeError if ``.grad`` is not the backward pass's gradient times one factor."""
        grads = {n: (torch.zeros_like(p) if p.grad is None else p.grad).to(total.dtype)[None]
                 for n, p in self.model.named_parameters() if n in self._tracked}
        with torch.no_grad():
            applied = compress_parameter_gradients(grads, self._specs, self.compression)[0]
        # float32 gradients (and rows) are compared to float32's precision, float64 ones to float64's
        tolerance = 1e-8 if total.dtype == torch.float64 else 1e-3
        applied = applied.double()
        total = total.double()
        norm = float(total.norm())
        if norm == 0.0:
            return 1.0
        scale = float(applied @ total) / norm ** 2
        residual = float((applied - scale * total).norm())
        if residual > tolerance * max(float(applied.norm()), norm * abs(scale)):
            raise RuntimeError(f"GradientRecorder.step(check_grads=True): the recorded parameters' .grad is not the "
                               f"backward pass's gradient times one factor (relative residual "
                               f"{residual / max(float(applied.norm()), 1e-30):.1e}): zero the gradients between "
                               "steps, and change them only by scaling (gradient-norm clipping)")
        # within the precision of the comparison of 1 the gradient was not scaled: 1 exactly, not its estimate
        return 1.0 if abs(scale - 1.0) <= (1e-12 if tolerance < 1e-3 else 1e-5) else scale

    def _rows(self, recorded: _Pass) -> Tensor:
        captured = {}
        for spec in self._specs:
            if spec.module not in recorded.inputs:
                raise RuntimeError(f"GradientRecorder: layer {spec.module!r} did not run in a forward pass with "
                                   "gradients; leave it out with module_name")
            grad = recorded.grads.get(spec.module)
            if grad is None:  # its output did not reach the loss: no share of the gradient
                shape, dtype, device = recorded.outputs[spec.module]
                grad = torch.zeros(shape, dtype=dtype, device=device)
            captured[spec.module] = layer_factors(spec, self._modules[spec.module], recorded.inputs[spec.module],
                                                  grad, recorded.examples, input_maps=self._input_maps,
                                                  check_finite=False)  # the rows are checked as they are stored
        with torch.no_grad():
            return compressed_gradients(compress_factors(captured, self.compression, indexed=self._input_maps),
                                        self.compression)

    def _open_segment(self, width: int) -> None:
        from .store import StoreWriter

        layout = [(b, k_out * k_in) for b, (k_out, k_in) in self.compression.dims.items()]
        self._writer = StoreWriter(self.path / f"segment-{len(self.segments):05d}", width=width,
                                   description=self.description(), layout=layout, dtype=self.dtype,
                                   columns=_COLUMNS)

    def checkpoint(self) -> Any:
        """Close the segment being written, paired with the model's state now; returns its FeatureStore (None if
        no step was recorded since the last checkpoint). The next step starts a new segment."""
        if self._writer is None:
            return None
        state = {k: v.detach() for k, v in self.model.state_dict().items()}
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        store = self._writer.close(state, device=str(device))
        self.segments.append(store.path)
        self._writer = None
        return store

    # -- Hugging Face --------------------------------------------------------------------------------

    def trainer_callback(self, *, segment: str = "epoch", index_key: Optional[str] = "index") -> Any:
        """A ``transformers.TrainerCallback`` recording every optimizer step of a ``Trainer`` through this recorder.

        ``segment``: ``"epoch"`` closes a segment at each epoch's end, ``"save"`` at
        each of the Trainer's checkpoint saves (the weights it writes pair with the
        segment). ``index_key``: a batch entry holding each example's dataset row, removed
        before the model sees it (give the dataset an integer column of that name, and
        ``TrainingArguments(remove_unused_columns=False)``); without it rows get -1.
        The learning rate of each row is the optimizer's at the step, and its ``scale``
        the factor gradient-norm clipping (``max_grad_norm``) applied. fp16 loss scaling
        (``fp16=True``) and gradient checkpointing are refused: the first scales the
        gradients the hooks see, the second recomputes the forward pass.
        """
        from transformers import TrainerCallback

        if segment not in ("epoch", "save"):
            raise ValueError(f"segment: expected 'epoch' or 'save', got {segment!r}")
        recorder = self

        class GradientRecorderCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                if getattr(args, "fp16", False):
                    raise ValueError("GradientRecorder: fp16=True scales the loss (and the gradients the hooks see) "
                                     "by a changing factor; train with bf16=True or in float32")
                if getattr(args, "gradient_checkpointing", False):
                    raise ValueError("GradientRecorder: gradient_checkpointing recomputes each layer's forward "
                                     "pass in the backward pass; train without it")
                model = kwargs.get("model")
                if model is not None and model is not recorder.model:
                    raise ValueError("GradientRecorder: the Trainer trains another model than the one recorded")
                recorder._index_key = index_key
                recorder.__enter__()

            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                optimizer = kwargs.get("optimizer")
                lr = None if optimizer is None else optimizer.param_groups[0]["lr"]
                recorder.step(lr=lr, check_grads=True)  # after the Trainer's clipping: its factor is recorded

            def on_epoch_end(self, args, state, control, **kwargs):
                if segment == "epoch":
                    recorder.checkpoint()

            def on_save(self, args, state, control, **kwargs):
                if segment == "save":
                    recorder.checkpoint()

            def on_train_end(self, args, state, control, **kwargs):
                recorder._index_key = None
                recorder.__exit__(None, None, None)

        return GradientRecorderCallback()


def attribute_recorded(attributor: Any, stores: Sequence[Any], test_dataloader: Any, n_train: int, *,
                       lr_weighted: bool = True) -> Tensor:
    """``(n_train, n_test)`` TracIn scores from recorded segments:
    ``Σ_c Σ_{rows r of example i} lr_r · scale_r · ⟨row_r, g̃_j⟩`` with ``g̃_j`` test example ``j``'s compressed
    gradient at checkpoint ``c`` and ``scale_r`` the factor clipping applied to the row's step (1 unclipped).

    Args:
        attributor: a :class:`attrib_torch.LoGraAttributor` with ``preconditioner="identity"``
            and the recorder's ``rank``, ``kind``, ``seed`` and layers, whose task holds one
            checkpoint per store: the weights each segment was closed with.
        stores: the segments (:meth:`GradientRecorder.checkpoint`'s stores, or opened
            from ``recorder.segments``), recorded with dataset indices.
        n_train: the training set's size (rows of the result).
        lr_weighted: weigh each row by its step's learning rate (TracIn's ``η_t``).

    Raises:
        StoreMismatch: a store of another compression, or whose checkpoint differs
            from the attributor's (the fingerprints of the states).
    """
    from .guard import untouched
    from .logra import LoGraAttributor
    from .store import FeatureStore, StoreMismatch, check_agrees, fingerprint_state

    if not isinstance(attributor, LoGraAttributor):
        raise TypeError(f"attributor: expected a LoGraAttributor, got {type(attributor).__name__}")
    if attributor.preconditioner != "identity" or attributor.normalize:
        raise ValueError("attributor: TracIn's scores are plain inner products; give it preconditioner='identity' "
                         "and normalize=False")
    if len(stores) != len(attributor.task) or not all(isinstance(s, FeatureStore) for s in stores):
        raise ValueError(f"stores: expected one FeatureStore per checkpoint of the attributor's task "
                         f"({len(attributor.task)}), got {len(stores)}")
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1:
        raise ValueError(f"n_train: expected a positive integer, got {n_train!r}")
    wanted = attributor.compression.description()
    with untouched(attributor.task):
        queries = []
        for c, store in enumerate(stores):
            check_agrees(f"stores[{c}] ({store.path})", store.manifest["description"], wanted, "the attributor's")
            check_agrees(f"stores[{c}] ({store.path})", store.manifest,
                         {"model": fingerprint_state(attributor._checkpoint_state(c))}, f"checkpoint {c}'s")
            index = store.column("index")
            if len(index) and (int(index.min()) < 0 or int(index.max()) >= n_train):
                raise StoreMismatch(f"stores[{c}] ({store.path}): its rows' dataset indices span "
                                    f"[{int(index.min())}, {int(index.max())}], outside [0, {n_train}) (rows "
                                    "recorded without indices have -1)")
            queries.append(torch.cat(list(attributor._grouped(test_dataloader, c, train=False))))
    scores = torch.zeros(n_train, queries[0].shape[0], dtype=queries[0].dtype, device=attributor.device)
    for store, query in zip(stores, queries):
        index, weight = store.column("index"), store.column("scale")  # what clipping left of each row
        if lr_weighted:
            weight = weight * store.column("lr")
        for start, block in store.blocks(8192):
            rows = block.to(attributor.device, query.dtype)
            part = (rows @ query.T) * weight[start : start + len(rows), None].to(rows.device, query.dtype)
            scores.index_add_(0, index[start : start + len(rows)].to(scores.device), part)
    return scores
