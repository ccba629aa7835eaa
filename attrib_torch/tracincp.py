"""Captum's TracIn-CP influence API (``TracInCP``, ``TracInCPFast``, ``TracInCPFastRandProj``) on the core.

Argument names, modes and orientation are captum's, so code moves over by changing
an import: batches are tuples whose last element holds the labels (``model(*batch[:-1])``
gives the outputs, ``loss_fn(outputs, batch[-1])`` the loss); influence scores are
``(n_inputs, n_train)``; ``checkpoints_load_func(model, checkpoint)`` loads a checkpoint
into the model and returns the learning rate that weighs it. Underneath, each
checkpoint's state is kept once and the work is :class:`TracInAttributor`'s: training
gradients computed once, exact factored products for Linear layers, streaming top-k.
"""

from __future__ import annotations

import glob
import math
import os
import re
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset

from attrib_core import layer_specs, project_factors, project_gradient

from .data import batch_size as examples_in, batches, check_loader
from .guard import untouched
from .task import AttributionTask
from .tracin import TracInAttributor
from .user_warning import warn

__all__ = ["KMostInfluentialResults", "TracInCP", "TracInCPFast", "TracInCPFastRandProj", "load_flexible_state_dict"]


class KMostInfluentialResults(NamedTuple):
    """Proponents (or opponents) of each input: ``indices`` and ``influence_scores``, each ``(n_inputs, k)``, best first."""

    indices: Tensor
    influence_scores: Tensor


def load_flexible_state_dict(model: nn.Module, path: str) -> float:
    """Load a checkpoint file into ``model``; its learning rate, or 1.0 if it stores none.

    The file holds a state dict, or a dict with ``"model_state_dict"`` and optionally
    ``"learning_rate"``.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "model_state_dict" in checkpoint:
        model.load_state_dict(checkpoint["model_state_dict"])
        return float(checkpoint.get("learning_rate", 1.0))
    model.load_state_dict(checkpoint)
    return 1.0


def _natural_key(path: str) -> list:
    """Sort ``ckpt-2`` before ``ckpt-10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def _read_checkpoints(model: nn.Module, checkpoints: Any,
                      load: Callable) -> Tuple[List[Any], List[Dict[str, Tensor]], List[float]]:
    """The checkpoints (paths in natural order), every one's state (copied) and learning rate.

    Each is loaded into the model by ``load`` to read it; the model then gets its own
    weights back (captum leaves the last checkpoint in it).
    """
    if isinstance(checkpoints, (str, os.PathLike)):
        directory = os.fspath(checkpoints)
        if not os.path.isdir(directory):
            raise ValueError(f"checkpoints: {directory!r} is not a directory")
        items: List[Any] = sorted((p for p in glob.glob(os.path.join(directory, "*")) if os.path.isfile(p)),
                                  key=_natural_key)
        if not items:
            raise ValueError(f"checkpoints: the directory {directory!r} holds no checkpoint files")
    elif isinstance(checkpoints, (list, tuple)):
        items = list(checkpoints)
        if items and all(isinstance(p, (str, os.PathLike)) for p in items):
            missing = [os.fspath(p) for p in items if not os.path.isfile(p)]
            if missing:
                raise ValueError(f"checkpoints: files not found: {missing}")
            items = sorted((os.fspath(p) for p in items), key=_natural_key)
    elif isinstance(checkpoints, Iterator):
        items = list(checkpoints)
    else:
        raise TypeError(f"checkpoints: expected a directory, a list of paths or an iterator, "
                        f"got {type(checkpoints).__name__}")
    if not items:
        raise ValueError("checkpoints: no checkpoints given")
    states, rates = [], []
    own = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        with untouched(model=model):
            for item in items:
                if item is None:
                    raise ValueError("checkpoints: a checkpoint is None")
                rate = load(model, item)
                states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
                rates.append(1.0 if rate is None else float(rate))
    finally:
        with torch.no_grad():
            model.load_state_dict(own)  # the model keeps its own weights
    return items, states, rates


def _check_reduction(loss_fn: Callable, sample_wise_grads_per_batch: bool, name: str) -> None:
    """Captum's rule: a per-example loss (``reduction="none"``) unless ``sample_wise_grads_per_batch``."""
    reduction = getattr(loss_fn, "reduction", None)
    if reduction is None:
        kind = "a sum over the batch" if sample_wise_grads_per_batch else "per-example (one loss per example)"
        warn(f"{name} has no 'reduction' attribute; assuming it is {kind}")
        return
    allowed = ("sum", "mean") if sample_wise_grads_per_batch else ("none",)
    if reduction not in allowed:
        raise ValueError(
            f"{name}: reduction {reduction!r} does not fit sample_wise_grads_per_batch="
            f"{sample_wise_grads_per_batch}; expected {' or '.join(map(repr, allowed))}"
        )


def _batch_loss(model: nn.Module, loss_fn: Callable) -> Callable:
    """``f(params, batch)``: ``loss_fn(model(*batch[:-1]), batch[-1])`` summed to a scalar.

    Each example reaches it as a batch of one, where a sum, a mean and a per-example
    loss all give that example's loss.
    """

    def f(params, batch):
        outputs = functional_call(model, params, tuple(batch[:-1]))
        return loss_fn(outputs, batch[-1]).sum()

    return f


class _TracInCPBase:
    """What the three classes share: the training loader, checkpoints, the influence modes."""

    def __init__(self, model: nn.Module, train_dataset: Union[Dataset, DataLoader], checkpoints: Any,
                 checkpoints_load_func: Callable, loss_fn: Callable, batch_size: Optional[int],
                 test_loss_fn: Optional[Callable]) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn: expected a callable (outputs, labels) -> loss")
        if test_loss_fn is not None and not callable(test_loss_fn):
            raise TypeError("test_loss_fn: expected a callable (outputs, labels) -> loss")
        if isinstance(train_dataset, DataLoader):
            check_loader(train_dataset, "train_dataset")
            self.train_dataloader = train_dataset
        elif isinstance(train_dataset, Dataset):
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"batch_size: expected an integer >= 1 for a Dataset, got {batch_size!r}")
            self.train_dataloader = DataLoader(train_dataset, batch_size=batch_size, shuffle=False)
        else:
            raise TypeError(f"train_dataset: expected a Dataset or a DataLoader, got {type(train_dataset).__name__}")
        self.model = model
        self.loss_fn = loss_fn
        self.test_loss_fn = test_loss_fn if test_loss_fn is not None else loss_fn
        self.checkpoints_load_func = checkpoints_load_func
        self.checkpoints, self.states, self.learning_rates = _read_checkpoints(model, checkpoints,
                                                                              checkpoints_load_func)
        self._n_train: Optional[int] = None

    # Subclasses build these two from the states: one for train x test, one for train x train.
    _attributor: TracInAttributor
    _self_attributor: TracInAttributor

    def _task(self, test_loss_fn: Callable) -> AttributionTask:
        return AttributionTask(_batch_loss(self.model, self.loss_fn), self.model, self.states,
                               target_func=_batch_loss(self.model, test_loss_fn))

    def _n_training(self) -> int:
        if self._n_train is None:
            self._n_train = sum(examples_in(b) for b in batches(self.train_dataloader, torch.device("cpu")))
        return self._n_train

    @classmethod
    def get_name(cls) -> str:
        """A readable name of the class, as captum's: the class name itself."""
        return cls.__name__

    def _test_batch(self, inputs: Any, unpack_inputs: bool) -> List[tuple]:
        """The inputs as a one-batch loader ``[(*features, labels)]``, checked by one forward pass."""
        if not isinstance(inputs, (tuple, list)) or len(inputs) < 2:
            raise ValueError("inputs: expected a tuple (*model_inputs, labels) whose last element holds the labels")
        features = tuple(inputs[:-1]) if unpack_inputs else (tuple(inputs[:-1]) if len(inputs) > 2 else inputs[0],)
        batch = (*features, inputs[-1])
        try:
            with untouched(model=self.model), torch.no_grad():
                self.test_loss_fn(self.model(*features), inputs[-1])
        except Exception as error:  # noqa: BLE001 - any failure here means the inputs do not fit the model
            raise ValueError(f"inputs: the model or test_loss_fn cannot run on them: "
                             f"{type(error).__name__}: {error}") from error
        return [batch]

    def _test_loader(self, inputs: Any, unpack_inputs: bool, name: str = "inputs") -> Any:
        """A test batch ``(*model_inputs, labels)`` or a DataLoader of them, as a loader."""
        if isinstance(inputs, DataLoader):
            check_loader(inputs, name)
            return inputs
        return self._test_batch(inputs, unpack_inputs)

    def influence(self, inputs: Any = None, k: Optional[int] = None, proponents: bool = True,
                  show_progress: bool = False, aggregate: bool = False, *,
                  unpack_inputs: bool = True) -> Union[Tensor, KMostInfluentialResults]:
        """Influence scores ``(n_inputs, n_train)`` (captum's orientation), or the ``k`` most influential.

        Args:
            inputs: a test batch ``(*model_inputs, labels)`` or a DataLoader of them
                (required, as in captum 0.9: self influence is :meth:`self_influence`).
            k: None for every score; an int for the ``k`` proponents (or opponents) of
                each input, found by streaming top-k (the full matrix is never formed);
                a ``k`` above the training set's size returns all of it, as captum does.
            proponents: largest scores (True) or smallest (False).
            show_progress: progress bars over the training data.
            aggregate: score the sum of the inputs' test losses instead of each
                (one row, ``(1, n_train)``, or the top ``k`` of that row).
            unpack_inputs: call ``model(*inputs[:-1])``; False passes them as one argument.

        Returns:
            ``(n_inputs, n_train)`` scores: entry ``[i, j]`` is training example ``j``'s
            influence on input ``i``, ``Σ_c lr_c ⟨∇ loss_j, ∇ test_loss_i⟩``; or
            :class:`KMostInfluentialResults`.

        Raises:
            ValueError: ``inputs`` missing, ``k`` not a positive integer, or inputs the
                model cannot run (before any gradient).
        """
        if inputs is None:
            raise ValueError("inputs: required; for self influence scores use the self_influence method instead")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"k: expected an integer >= 1 or None, got {k!r}")
        test = self._test_loader(inputs, unpack_inputs)
        self._attributor.show_progress = show_progress
        self._attributor.progress_desc = (
            f"Using {self.get_name()} to compute influence for training batches" if k is None else
            f"Using {self.get_name()} to perform computation for getting "
            f"{'proponents' if proponents else 'opponents'}. Processing training batches")
        if aggregate:  # scores are linear in the test gradient: the sum's score is the sum of the scores
            summed = self._attributor.attribute(self.train_dataloader, test).sum(1)[None]
            if k is None:
                return summed
            top = torch.topk(summed, min(k, summed.shape[1]), dim=1, largest=proponents, sorted=True)
            return KMostInfluentialResults(top.indices, top.values)
        if k is None:
            return self._attributor.attribute(self.train_dataloader, test).T.contiguous()
        top = self._attributor.topk(test, min(k, self._n_training()), proponents=proponents,
                                    train_dataloader=self.train_dataloader)
        return KMostInfluentialResults(top.indices, top.values)

    def self_influence(self, inputs: Any = None, show_progress: bool = False,
                       outer_loop_by_checkpoints: bool = False) -> Tensor:
        """``(n,)``: each example's influence on itself, ``Σ_c lr_c ‖∇ loss‖²``, over the training set or ``inputs``.

        ``inputs`` may be a batch ``(*model_inputs, labels)`` or a DataLoader of them.
        ``outer_loop_by_checkpoints`` changes only the progress bars (one over checkpoints
        as well, as captum's): gradients are computed once per checkpoint either way.
        """
        loader = self.train_dataloader if inputs is None else self._test_loader(inputs, True)
        self._self_attributor.show_progress = show_progress
        self._self_attributor.progress_desc = f"Using {self.get_name()} to compute self influence. Processing batch"
        self._self_attributor.checkpoint_progress_desc = (
            f"Using {self.get_name()} to compute self influence. Processing checkpoint"
            if outer_loop_by_checkpoints else None)
        return self._self_attributor.self_attribute(loader)

    def compute_intermediate_quantities(self, inputs: Any, aggregate: bool = False) -> Tensor:
        """Vectors whose dot products are the influence scores: ``(N, D · C)``, or their sum ``(1, D · C)``.

        Per checkpoint ``c``, ``sqrt(lr_c)`` times each example's gradient of ``loss_fn``
        (projected, for :class:`TracInCPFastRandProj`), checkpoints side by side. (captum
        documents this dot-product property; its TracInCP multiplies by ``lr_c`` instead
        of its square root, which holds only for learning rates of 1.)

        Raises:
            ValueError: a negative learning rate (its square root is not real).
        """
        negative = [r for r in self.learning_rates if r < 0]
        if negative:
            raise ValueError(f"checkpoints: learning rates {negative} are negative; no real vectors have "
                             "these influence scores as dot products")
        loader = self._test_loader(inputs, True)
        attributor = self._self_attributor
        parts = []
        for ckpt_idx, rate in enumerate(self.learning_rates):
            rows = attributor.gradients(ckpt_idx, loader)
            parts.append(math.sqrt(rate) * (rows.sum(0, keepdim=True) if aggregate else rows))
        return torch.cat(parts, dim=1)


class TracInCP(_TracInCPBase):
    """TracIn-CP (Pruthi et al., NeurIPS 2020) over all parameters, or those of ``layers``.

    Args:
        model: the network; checkpoints are loaded into it.
        train_dataset: a Dataset (batched by ``batch_size``) or a sequential DataLoader.
        checkpoints: a directory (its files in natural order), a list of paths, or an
            iterator of objects ``checkpoints_load_func`` understands.
        checkpoints_load_func: ``(model, checkpoint) -> learning rate``.
        layers: module names whose parameters the gradients cover; None for all.
        loss_fn: ``(outputs, labels) -> loss``: per-example (``reduction="none"``) when
            ``sample_wise_grads_per_batch`` is False, a sum or mean when it is True.
            Either way each training example's own loss gradient is used.
        batch_size: for a Dataset.
        sample_wise_grads_per_batch: checked against ``loss_fn``'s reduction, as in captum.
        test_loss_fn: the loss on test inputs; ``loss_fn`` by default.

    Raises:
        ValueError: no checkpoints, a layer not in the model, a reduction that does not
            fit ``sample_wise_grads_per_batch`` (before any gradient).
    """

    def __init__(self, model: nn.Module, train_dataset: Union[Dataset, DataLoader], checkpoints: Any,
                 checkpoints_load_func: Callable = load_flexible_state_dict, layers: Optional[List[str]] = None,
                 loss_fn: Optional[Callable] = None, batch_size: Optional[int] = 1,
                 sample_wise_grads_per_batch: bool = False, test_loss_fn: Optional[Callable] = None) -> None:
        _check_reduction(loss_fn, sample_wise_grads_per_batch, "loss_fn")
        if test_loss_fn is not None:
            _check_reduction(test_loss_fn, sample_wise_grads_per_batch, "test_loss_fn")
        if layers is not None:
            if isinstance(layers, str) or not all(isinstance(n, str) for n in layers) or not layers:
                raise ValueError(f"layers: expected a non-empty list of module names, got {layers!r}")
            modules = dict(model.named_modules())
            unknown = [n for n in layers if n not in modules]
            if unknown:
                raise ValueError(f"layers: {unknown} are not modules of the model; modules: {[m for m in modules if m]}")
        super().__init__(model, train_dataset, checkpoints, checkpoints_load_func, loss_fn, batch_size, test_loss_fn)
        self.layers = layers
        self.sample_wise_grads_per_batch = sample_wise_grads_per_batch
        self._attributor = TracInAttributor(self._task(self.test_loss_fn), self.learning_rates, False,
                                            layer_name=layers, show_progress=False)
        self._self_attributor = (self._attributor if self.test_loss_fn is self.loss_fn else
                                 TracInAttributor(self._task(self.loss_fn), self.learning_rates, False,
                                                  layer_name=layers, show_progress=False))


def _final_layer(model: nn.Module, final_fc_layer: Union[str, nn.Module]) -> str:
    """The module name of ``final_fc_layer`` (a name or the module itself), checked to be an ``nn.Linear``."""
    modules = dict(model.named_modules())
    if isinstance(final_fc_layer, nn.Module):
        names = [n for n, m in modules.items() if m is final_fc_layer]
        if not names:
            raise ValueError("final_fc_layer: the module given is not part of the model")
        final_fc_layer = names[0]
    if final_fc_layer not in modules:
        raise ValueError(f"final_fc_layer: {final_fc_layer!r} is not a module of the model; "
                         f"modules: {[n for n in modules if n]}")
    if not isinstance(modules[final_fc_layer], nn.Linear):
        raise ValueError(f"final_fc_layer: {final_fc_layer!r} is a {type(modules[final_fc_layer]).__name__}, "
                         "not an nn.Linear")
    return final_fc_layer


def _batch_reduction(loss_fn: Callable, name: str) -> None:
    """The fast variants need a loss reduced over the batch (``"sum"`` or ``"mean"``), as in captum."""
    reduction = getattr(loss_fn, "reduction", None)
    if reduction is not None and reduction not in ("sum", "mean"):
        raise ValueError(f"{name}: reduction must be 'sum' or 'mean' for the fast TracIn variants, got {reduction!r}")


class TracInCPFast(_TracInCPBase):
    """TracIn-CP on the weight of the final fully-connected layer, from its inputs and output gradients.

    For that weight the per-example gradient is ``ds ⊗ a`` (``a`` the layer's input,
    ``ds`` the loss gradient at its output), so ``⟨g_i, g_j⟩ = (a_i·a_j)(ds_i·ds_j)``:
    computed exactly from one batched backward pass per batch, never forming
    per-example weight gradients (:func:`attrib_core.factored_inner`). The bias is not
    included, as in captum.

    Args:
        model, train_dataset, checkpoints, checkpoints_load_func, batch_size, test_loss_fn:
            as in :class:`TracInCP`.
        final_fc_layer: the final ``nn.Linear``, by module name or as the module.
        loss_fn: a loss reduced over the batch, ``"sum"`` or ``"mean"``.
        vectorize: accepted for compatibility; no effect.
    """

    def __init__(self, model: nn.Module, final_fc_layer: Union[str, nn.Module],
                 train_dataset: Union[Dataset, DataLoader], checkpoints: Any,
                 checkpoints_load_func: Callable = load_flexible_state_dict, loss_fn: Optional[Callable] = None,
                 batch_size: Optional[int] = 1, test_loss_fn: Optional[Callable] = None,
                 vectorize: bool = False) -> None:
        self.final_fc_layer = _final_layer(model, final_fc_layer)
        _batch_reduction(loss_fn, "loss_fn")
        if test_loss_fn is not None:
            _batch_reduction(test_loss_fn, "test_loss_fn")
        super().__init__(model, train_dataset, checkpoints, checkpoints_load_func, loss_fn, batch_size, test_loss_fn)
        self._attributor = self._make(self.test_loss_fn)
        self._self_attributor = self._attributor if self.test_loss_fn is self.loss_fn else self._make(self.loss_fn)

    def _make(self, test_loss_fn: Callable) -> TracInAttributor:
        return TracInAttributor(self._task(test_loss_fn), self.learning_rates, False,
                                layer_name=f"{self.final_fc_layer}.weight" if self.final_fc_layer else "weight",
                                show_progress=False)


class TracInCPFastRandProj(TracInCPFast):
    """:class:`TracInCPFast` with the final layer's gradients compressed by random projections, as captum's.

    Below the weight's size (``projection_dim < d_out · d_in``) each factor of the
    gradient ``G = ds aᵀ`` is projected on its own, to ``k = int(sqrt(projection_dim))``
    dimensions at most (``min(d_out, k)`` and ``min(d_in, k)``): the compressed gradient
    ``R_outᵀ G R_in`` has about ``projection_dim`` entries per checkpoint, as in captum
    (:mod:`attrib_core.two_sided`). At or above it, or with ``projection_dim=None``,
    nothing is projected and the scores are exact. The matrices are
    :func:`kernels.project`'s (Rademacher, never materialised, the same for a seed on
    every device and batch size); proponents are found by exact streaming top-k in the
    compressed space, so ``nearest_neighbors`` is not needed.

    Args:
        projection_dim: ``>= 1``, or None.
        seed: the projection's seed.
        nearest_neighbors: accepted for compatibility; no effect.
    """

    def __init__(self, model: nn.Module, final_fc_layer: Union[str, nn.Module],
                 train_dataset: Union[Dataset, DataLoader], checkpoints: Any,
                 checkpoints_load_func: Callable = load_flexible_state_dict, loss_fn: Optional[Callable] = None,
                 batch_size: Optional[int] = 1, test_loss_fn: Optional[Callable] = None, vectorize: bool = False,
                 nearest_neighbors: Any = None, projection_dim: Optional[int] = None, seed: int = 0) -> None:
        if projection_dim is not None and (isinstance(projection_dim, bool) or not isinstance(projection_dim, int)
                                           or projection_dim < 1):
            raise ValueError(f"projection_dim: expected an integer >= 1 or None, got {projection_dim!r}")
        self.projection_dim = projection_dim
        self.seed = seed
        super().__init__(model, final_fc_layer, train_dataset, checkpoints, checkpoints_load_func, loss_fn,
                         batch_size, test_loss_fn, vectorize)

    def _make(self, test_loss_fn: Callable) -> TracInAttributor:
        layer = self.model.get_submodule(self.final_fc_layer)
        d_out, d_in = layer.weight.shape
        if self.projection_dim is None or self.projection_dim >= d_out * d_in:
            return super()._make(test_loss_fn)
        side = max(1, int(math.isqrt(self.projection_dim)))
        return _CompressedLayerTracIn(self._task(test_loss_fn), self.learning_rates, self.final_fc_layer,
                                      (min(d_out, side), min(d_in, side)), self.seed)


class _CompressedLayerTracIn(TracInAttributor):
    """TracIn on one Linear layer's weight, its gradients compressed two-sided to ``R_outᵀ G R_in``."""

    def __init__(self, task: AttributionTask, weights: List[float], module: str, dims: Tuple[int, int],
                 seed: int) -> None:
        super().__init__(task, weights, False, layer_name=f"{module}.weight" if module else "weight",
                         show_progress=False)
        chosen = {n: task.params(0)[n] for n in self.names}
        (self._spec,) = layer_specs(task.get_model(), chosen, [module])
        self._dims = dims
        self._seed = seed

    def _represent(self, rep: Any) -> Any:
        if isinstance(rep, dict):
            return project_factors(rep, {self._spec.module: self._dims}, self._seed)
        return project_gradient(rep, self._spec, self._dims, self._seed)
