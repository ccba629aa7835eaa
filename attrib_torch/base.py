"""The attributor base classes: representations of training and test data, scored by inner products.

An inner-product attributor maps each training example to a representation
(by default its loss gradient), each test example to one (by default its target
gradient), may transform either (an inverse Hessian, a projection), and scores a
pair by the inner product. Training representations are computed once per
checkpoint and training loader and kept; a test batch is transformed once, over
the whole training set, and scored through :mod:`kernels`.

Scores are ``(n_train, n_test)``, combined over the task's checkpoints by
:meth:`BaseInnerProductAttributor.checkpoint_weights` (the mean unless a subclass
says otherwise); a positive score means the training example helps the test
prediction.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

import kernels
from attrib_core import rep_concat, rep_inner, rep_rows, rep_rowwise, rep_slice
from kernels import TopK

from .data import batches, check_loader, fingerprint
from .guard import guard_public_methods, untouched
from .per_example import PerExampleGradients
from .task import AttributionTask

__all__ = ["BaseAttributor", "BaseInnerProductAttributor"]

_GROUP_MAX_ROWS = 256
_GROUP_BYTES = 256 << 20


class BaseAttributor(ABC):
    """What every attributor answers: ``cache``, ``attribute`` and ``self_attribute``.

    Every subclass's public methods run inside :func:`attrib_torch.guard.untouched`:
    the model in eval mode, and the user's model and torch's global random state as
    they were afterwards, also after an exception; a ``cache`` that fails leaves
    nothing cached.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        guard_public_methods(cls)

    def clear_cache(self) -> None:
        """Forget everything computed from training data; the next call recomputes it."""
        self.full_train_dataloader = None

    @abstractmethod
    def cache(self, full_train_dataloader: Any) -> None:
        """Precompute what depends on the full training set only."""

    @abstractmethod
    def attribute(self, train_dataloader: Any, test_dataloader: Any) -> Tensor:
        """Scores ``(n_train, n_test)``."""

    @abstractmethod
    def self_attribute(self, train_dataloader: Any = None) -> Tensor:
        """Each training example's score with itself, ``(n_train,)``."""


class BaseInnerProductAttributor(BaseAttributor):
    """Scores ``⟨transform_train_rep(g_train), transform_test_rep(g_test)⟩``, averaged over checkpoints.

    Args:
        task: the :class:`AttributionTask`.
        layer_name: parameter names or module prefixes to take gradients with
            respect to (a string is one name); None for all parameters.
        device: where representations are computed.
        show_progress: progress bars over data loaders.

    Raises:
        ValueError: a ``layer_name`` that matches no parameter (before any gradient).
    """

    def __init__(
        self,
        task: AttributionTask,
        layer_name: Union[None, str, Sequence[str]] = None,
        device: Union[str, torch.device, None] = "cpu",
        show_progress: bool = True,
    ) -> None:
        if not isinstance(task, AttributionTask):
            raise TypeError(f"task: expected an AttributionTask, got {type(task).__name__}")
        self.task = task
        self.device = torch.device(device if device is not None else "cpu")
        self.show_progress = show_progress
        self.layer_name = layer_name
        first = task.params(0)  # inside the constructor's borrow (guard_public_methods): loaded for now only
        self.names = list(task.selected(first, layer_name))  # raises on unknown names
        self._width = sum(first[n].numel() for n in self.names)
        self.full_train_dataloader: Any = None
        self._cache_key: Any = None  # fingerprint of full_train_dataloader when it was cached
        self._train_reps: Dict[int, Tuple[Any, Any, Tensor]] = {}  # (loader, its fingerprint, representations)
        self._gradients = PerExampleGradients()  # vmap, else hooks, else a loop: decided on first use
        self._stores: Dict[int, Any] = {}  # per checkpoint, the FeatureStore cache() reads representations from
        self._distributed = False  # cache(distributed=True): ranks share the work on stores

    # The progress bars' texts over training batches and over checkpoints (self_attribute), when a front
    # end (captum's TracInCP) names them.
    progress_desc: Optional[str] = None
    checkpoint_progress_desc: Optional[str] = None

    # Per-checkpoint dicts of what cache() computed, emptied by clear_cache().
    _cache_fields: Tuple[str, ...] = ("_train_reps",)

    def clear_cache(self) -> None:
        """Forget the cached training loader, its representations and every curvature fitted on it."""
        self.full_train_dataloader = None
        self._cache_key = None
        self._stores = {}
        self._distributed = False
        for field in self._cache_fields:
            getattr(self, field).clear()

    # -- representations ---------------------------------------------------------------------

    def _split_params(self, ckpt_idx: int) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
        """(chosen, fixed) parameters of checkpoint ``ckpt_idx`` on the device."""
        params = {k: v.to(self.device) for k, v in self.task.params(ckpt_idx).items()}
        chosen = {k: params[k] for k in self.names}
        return chosen, {k: v for k, v in params.items() if k not in chosen}

    def _restricted(self, func, fixed: Dict[str, Tensor]):
        return lambda chosen, data: func({**fixed, **chosen}, data)

    def generate_train_rep(self, ckpt_idx: int, data: Tuple[Tensor, ...]) -> Tensor:
        """Per-example gradients of ``loss_func`` on a batch (with its batch dimension), ``(B, P)``."""
        chosen, fixed = self._split_params(ckpt_idx)
        return self._gradients(self.task.get_model(), self.task.loss_func, fixed, chosen, data, "loss_func")

    def generate_test_rep(self, ckpt_idx: int, data: Tuple[Tensor, ...]) -> Tensor:
        """Per-example gradients of ``target_func`` on a batch (with its batch dimension), ``(B, P)``."""
        chosen, fixed = self._split_params(ckpt_idx)
        return self._gradients(self.task.get_model(), self.task.target_func, fixed, chosen, data, "target_func")

    def transform_train_rep(self, ckpt_idx: int, train_rep: Tensor) -> Tensor:
        """Identity here; subclasses project or precondition."""
        return train_rep

    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        """Identity here; influence functions apply an inverse Hessian."""
        return test_rep

    # -- caching -------------------------------------------------------------------------------

    def cache(self, full_train_dataloader: Any, stores: Optional[Sequence[Any]] = None, *,
              distributed: bool = False) -> None:
        """Keep the full training loader and precompute, per checkpoint, what the transforms need.

        ``stores``: one :class:`attrib_torch.store.FeatureStore` per checkpoint, built by
        :meth:`build_store` over this loader's dataset; the training representations are
        then read from them instead of computed (each store is checked to hold this
        attributor's features of that checkpoint's parameters over this data).
        ``distributed`` (under ``torch.distributed``, every rank calling with the same
        arguments): each rank reads its share of the stores' rows for what is fitted on
        them (LoGra's Fisher), the ranks' sums are all-reduced, and :meth:`topk` over the
        stores scans a rank's share and gathers the top-k; every rank gets the single
        process's answer (fits up to the order of floating-point sums).
        """
        check_loader(full_train_dataloader, "full_train_dataloader")
        self.check_checkpoints()
        if not isinstance(distributed, bool):
            raise TypeError(f"distributed: expected a bool, got {type(distributed).__name__}")
        if stores is not None:
            self._check_stores(full_train_dataloader, stores)
        self.clear_cache()
        self.full_train_dataloader = full_train_dataloader
        self._cache_key = fingerprint(full_train_dataloader)
        self._stores = {} if stores is None else dict(enumerate(stores))
        self._distributed = distributed
        for ckpt_idx in range(len(self.task)):
            self._prepare(ckpt_idx)

    # -- stores ---------------------------------------------------------------------------------

    def store_description(self, ckpt_idx: int) -> Dict[str, Any]:
        """What this attributor's training representations are (JSON values): a store holding others is refused."""
        return {"attributor": type(self).__name__, "parameters": list(self.names), "width": self.rep_width,
                "loss": _qualified_name(self.task.loss_func)}

    def _checkpoint_state(self, ckpt_idx: int) -> Dict[str, Tensor]:
        """Checkpoint ``ckpt_idx``'s whole state (parameters and buffers, which the features depend on too)."""
        self.task.params(ckpt_idx)  # loads it into the model
        return {k: v.detach() for k, v in self.task.get_model().state_dict().items()}

    @property
    def rep_width(self) -> int:
        """Numbers per example in the training representations a store holds (:meth:`stored_rep`)."""
        return self._width

    def stored_rep(self, ckpt_idx: int, data: Any) -> Tensor:
        """What a store holds of a training batch: :meth:`generate_train_rep` here."""
        return self.generate_train_rep(ckpt_idx, data)

    def transform_stored_rep(self, ckpt_idx: int, rows: Tensor) -> Tensor:
        """Stored rows to scoring representations: :meth:`transform_train_rep` here."""
        return self.transform_train_rep(ckpt_idx, rows)

    def stored_token_rep(self, ckpt_idx: int, data: Any) -> Any:
        """What a per-token store holds of a training batch (:class:`attrib_torch.store.TokenRows`): rows that
        add up, per example, to :meth:`stored_rep`. Only attributors with per-token representations have them."""
        raise ValueError(f"per_token: {type(self).__name__} has no per-token representations (LoGraAttributor "
                         "has); build a store of one row per example")

    def _has_token_reps(self) -> bool:
        return type(self).stored_token_rep is not BaseInnerProductAttributor.stored_token_rep

    def build_store(self, path: Any, dataset: Any, *, ckpt_idx: int = 0, dtype: str = "float32",
                    per_token: bool = False, batch_size: int = 32, chunk_rows: int = 1024, rank: int = 0,
                    world: int = 1, timings: Optional[Dict[str, float]] = None) -> Any:
        """Featurise ``dataset`` (map-style) into a store of this attributor's training representations of
        checkpoint ``ckpt_idx`` (:func:`attrib_torch.store.build_store`: resumable, one shard per writer); with
        ``per_token``, one row per kept position (:meth:`stored_token_rep`)."""
        from .store import build_store

        if per_token is True and not self._has_token_reps():
            self.stored_token_rep(ckpt_idx, None)  # raises, naming the attributors that have them
        featurize = self.stored_token_rep if per_token is True else self.stored_rep
        with untouched(self.task):
            state = self._checkpoint_state(ckpt_idx)
            return build_store(path, lambda batch: featurize(ckpt_idx, batch), dataset, width=self.rep_width,
                               description=self.store_description(ckpt_idx), model_state=state, dtype=dtype,
                               per_token=per_token, batch_size=batch_size, chunk_rows=chunk_rows, rank=rank,
                               world=world, device=self.device, show_progress=self.show_progress, timings=timings)

    def _check_stores(self, loader: Any, stores: Sequence[Any]) -> None:
        """Each store holds this attributor's features of its checkpoint over ``loader``'s dataset, or a
        StoreMismatch naming what differs."""
        from torch.utils.data import DataLoader, SequentialSampler

        from .store import FeatureStore, StoreMismatch, check_agrees, fingerprint_data, fingerprint_state

        if len(stores) != len(self.task):
            raise ValueError(f"stores: expected one per checkpoint ({len(self.task)}), got {len(stores)}")
        if not isinstance(loader, DataLoader) or not isinstance(loader.sampler, SequentialSampler):
            raise ValueError("stores: the training loader must be a DataLoader that reads its dataset in order, "
                             "as the store was built")
        data = fingerprint_data(loader.dataset)
        for ckpt_idx, store in enumerate(stores):
            if not isinstance(store, FeatureStore):
                raise TypeError(f"stores[{ckpt_idx}]: expected a FeatureStore, got {type(store).__name__}")
            state = self._checkpoint_state(ckpt_idx)
            if store.per_token and not self._has_token_reps():
                raise StoreMismatch(f"stores[{ckpt_idx}] ({store.path}): a per-token store, and "
                                    f"{type(self).__name__} has no per-token representations to add up")
            wanted = {"description": self.store_description(ckpt_idx), "model": fingerprint_state(state),
                      "data": data, "examples": len(loader.dataset), "width": self.rep_width}
            check_agrees(f"stores[{ckpt_idx}] ({store.path})", store.manifest, wanted, "this attributor's")

    def check_checkpoints(self) -> None:
        """Every checkpoint holds the attributed parameters, with the shapes of the first (before any gradient).

        Raises:
            ValueError: naming the checkpoint and the missing or misshapen parameters.
        """
        first = self.task.params(0)
        for ckpt_idx in range(1, len(self.task)):
            try:
                params = self.task.params(ckpt_idx)
            except RuntimeError as error:  # load_state_dict: missing or unexpected keys, size mismatch
                raise ValueError(f"checkpoints[{ckpt_idx}]: does not load into the model: "
                                 f"{str(error).splitlines()[0]}") from error
            missing = [n for n in self.names if n not in params]
            shapes = [n for n in self.names if n in params and params[n].shape != first[n].shape]
            if missing or shapes:
                raise ValueError(f"checkpoints[{ckpt_idx}]: parameters {missing} missing and {shapes} of another "
                                 "shape than in checkpoint 0")

    def _prepare(self, ckpt_idx: int) -> None:
        """Per-checkpoint precomputation from ``self.full_train_dataloader``; nothing by default."""

    def _ensure_cached(self, train_dataloader: Any) -> None:
        """Cache ``train_dataloader`` if nothing is cached, and recache when the cached data changed."""
        if self.full_train_dataloader is None or fingerprint(self.full_train_dataloader) != self._cache_key:
            self.cache(train_dataloader if self.full_train_dataloader is None else self.full_train_dataloader)

    def train_reps(self, ckpt_idx: int, train_dataloader: Any) -> Tensor:
        """Transformed training representations ``(n_train, P')``, computed once per checkpoint and loader.

        Kept under the loader's :func:`~attrib_torch.data.fingerprint`, so data changed
        in place (or a loader of another length) is featurised again.
        """
        key = fingerprint(train_dataloader)
        kept = self._train_reps.get(ckpt_idx)
        # The loader itself is held, so its id in the key cannot be reused by another loader.
        if kept is not None and kept[0] is train_dataloader and kept[1] == key:
            return kept[2]
        # Untransformed representations are joined once, not first into groups and then again.
        identity = type(self).transform_train_rep is BaseInnerProductAttributor.transform_train_rep
        reps = rep_concat(list(self._grouped(train_dataloader, ckpt_idx, train=True, group=not identity)))
        self._train_reps[ckpt_idx] = (train_dataloader, key, reps)
        return reps

    def _keep_train_reps(self, ckpt_idx: int, train_dataloader: Any, reps: Any) -> None:
        """Keep transformed training representations a subclass computed itself (as :meth:`train_reps` keeps its own)."""
        self._train_reps[ckpt_idx] = (train_dataloader, fingerprint(train_dataloader), reps)

    def _grouped(self, loader: Any, ckpt_idx: int, *, train: bool, transform: Any = None,
                 group: bool = True, share: bool = False) -> Iterator[Tensor]:
        """Transformed representations of a loader's examples, transformed a group of rows at a time.

        Loader batches are gathered into groups of up to 256 rows (fewer for wide
        models: about 256 MiB of gradients, which kept the scale benchmark under
        1.5 GB where 512 MiB did not) before the transform, since a projection
        regenerates its matrix once per call: on a 1.1M-parameter model, projecting 128
        rows at once was 2.2x faster (dense) and 2x (SJLT) than 4 calls of 32.
        ``transform(ckpt_idx, rep)`` replaces the train or test transform when given;
        ``group=False`` transforms and yields each loader batch on its own. ``share``
        (rows read from a store under ``torch.distributed``): this rank's groups only,
        every ``world``-th from its rank.
        """
        generate = self.generate_train_rep if train else self.generate_test_rep
        explicit = transform
        if transform is None:
            transform = self.transform_train_rep if train else self.transform_test_rep
        limit = max(1, min(_GROUP_MAX_ROWS, _GROUP_BYTES // (4 * self._width)))
        store = self._stores.get(ckpt_idx) if train and loader is self.full_train_dataloader else None
        if store is not None:  # the representations were computed before, into a store: read them
            if explicit is None:
                transform = self.transform_stored_rep
            from .distributed import world
            from .store import stored_examples

            part = world() if share else (0, 1)
            for _, rows in stored_examples(store, limit if group else self._store_batch(loader), part=part):
                yield transform(ckpt_idx, rows.to(self.device))
            return
        pending: List[Tensor] = []
        rows = 0
        desc = (self.progress_desc if train and self.progress_desc else
                f"{'train' if train else 'test'} gradients, checkpoint {ckpt_idx}")
        named = bool(train and self.progress_desc)  # a front end's bar stays on screen, as captum's does
        for batch in batches(loader, self.device, desc=desc, show_progress=self.show_progress, leave=named):
            pending.append(generate(ckpt_idx, batch))
            rows += rep_rows(pending[-1])
            if rows >= limit or not group:
                yield transform(ckpt_idx, rep_concat(pending))
                pending, rows = [], 0
        if pending:
            yield transform(ckpt_idx, rep_concat(pending))

    @staticmethod
    def _store_batch(loader: Any) -> int:
        return max(1, getattr(loader, "batch_size", None) or 1)

    # -- answers ---------------------------------------------------------------------------------

    def attribute(self, train_dataloader: Any, test_dataloader: Any) -> Tensor:
        """Scores ``(n_train, n_test)``: entry ``[i, j]`` for training example ``i`` and test example ``j``.

        The loaders must not shuffle. Calls :meth:`cache` with ``train_dataloader``
        first if it has not been called.
        """
        check_loader(train_dataloader, "train_dataloader")
        check_loader(test_dataloader, "test_dataloader")
        self._ensure_cached(train_dataloader)
        return self._scores(train_dataloader, test_dataloader)

    def _scores(self, train_dataloader: Any, test_dataloader: Any) -> Tensor:
        """``(n_train, n_test)`` combined over checkpoints, for checked loaders with the cache in place.

        What every front end's ``attribute`` computes, whatever order its public
        signature takes the loaders in (TRAK's takes the test loader first).
        """
        return self._combined(lambda ckpt_idx: self._checkpoint_scores(ckpt_idx, train_dataloader, test_dataloader))

    def _checkpoint_scores(self, ckpt_idx: int, train_dataloader: Any, test_dataloader: Any) -> Tensor:
        """``(n_train, n_test)`` scores of one checkpoint."""
        train = self.train_reps(ckpt_idx, train_dataloader)
        blocks = [rep_inner(train, test) for test in self._grouped(test_dataloader, ckpt_idx, train=False)]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)

    def _combined(self, per_checkpoint: Any) -> Tensor:
        """``Σ_c w_c · per_checkpoint(c)`` over the task's checkpoints (:meth:`checkpoint_weights`)."""
        total: Optional[Tensor] = None
        for ckpt_idx, weight in enumerate(self.checkpoint_weights()):
            scores = weight * per_checkpoint(ckpt_idx)
            total = scores if total is None else total + scores
        return total

    def _training_loader(self, train_dataloader: Any) -> Any:
        """The given training loader, else the cached one; checked, and cached if nothing was."""
        loader = train_dataloader if train_dataloader is not None else self.full_train_dataloader
        if loader is None:
            raise ValueError("train_dataloader: none given and cache() has not been called")
        check_loader(loader, "train_dataloader")
        self._ensure_cached(loader)
        return loader

    def _row_scale(self, train_dataloader: Any) -> Optional[Tensor]:
        """A per-training-example factor applied to every score row (TRAK's ``Q``); none here."""
        return None

    def checkpoint_weights(self) -> List[float]:
        """How checkpoints combine: ``score = Σ_c w_c · score_c``; the mean here (TracIn weighs by learning rate)."""
        return [1.0 / len(self.task)] * len(self.task)

    def self_attribute(self, train_dataloader: Any = None) -> Tensor:
        """``(n_train,)``: the diagonal of ``attribute(train, train)`` without the rest of it."""
        loader = self._training_loader(train_dataloader)
        total: Optional[Tensor] = None
        weights = self.checkpoint_weights()
        checkpoints = tqdm(enumerate(weights), total=len(weights), desc=self.checkpoint_progress_desc,
                           disable=not (self.show_progress and self.checkpoint_progress_desc), mininterval=0.0)
        for ckpt_idx, weight in checkpoints:
            parts = []
            pairs = zip(self._grouped(loader, ckpt_idx, train=True), self._grouped(loader, ckpt_idx, train=False))
            for train, test in pairs:  # the same loader, so the same groups of rows
                parts.append(rep_rowwise(train, test))
            values = weight * torch.cat(parts)
            total = values if total is None else total + values
        return total

    def topk(
        self, test_dataloader: Any, k: int, proponents: bool = True, train_dataloader: Any = None
    ) -> TopK:
        """For each test example, the ``k`` strongest proponents (or opponents) among the training examples.

        Scores blocks of training examples (about 16M scores a block), combined over
        checkpoints, and merges each into a running top-k (:func:`kernels.merge_topk`);
        the ``(n_train, n_test)`` matrix is never formed. Ties go to the smaller index.

        Returns:
            ``TopK(values, indices)``, each ``(n_test, k)``, best first.

        Raises:
            ValueError: ``k`` not in ``[1, n_train]``.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected an integer >= 1, got {k!r}")
        loader = self._training_loader(train_dataloader)
        check_loader(test_dataloader, "test_dataloader")
        weights = self.checkpoint_weights()
        if loader is self.full_train_dataloader and len(self._stores) == len(weights):
            return self._stored_topk(test_dataloader, k, proponents, tokens=False)
        train = [self.train_reps(c, loader) for c in range(len(weights))]
        n = rep_rows(train[0])
        if k > n:  # known once the training representations (kept for later calls) exist, before the test's
            raise ValueError(f"k: expected an integer in [1, {n}] (the training examples), got {k}")
        test = [rep_concat(list(self._grouped(test_dataloader, c, train=False))) for c in range(len(weights))]
        m = rep_rows(test[0])
        scale = self._row_scale(loader)
        block = max(k, (1 << 24) // max(m, 1))
        running = None
        starts = range(0, n, block)
        if self.progress_desc:  # a front end's bar over the training rows scored (kept gradients or not)
            starts = tqdm(starts, desc=self.progress_desc, disable=not self.show_progress, leave=True)
        for start in starts:
            stop = min(n, start + block)
            scores = sum(w * rep_inner(rep_slice(tr, start, stop), te) for tr, te, w in zip(train, test, weights))
            if scale is not None:
                scores = scores * scale[start:stop, None].to(scores.dtype)
            if running is None:
                running = kernels.empty_topk(m, scores.dtype, scores.device)
            running = kernels.merge_topk(running, scores.T, start, k, largest=proponents)
        return running

    def test_representations(self, test_dataloader: Any, ckpt_idx: int = 0) -> Tensor:
        """``(n_test, width)``: the transformed test representations of checkpoint ``ckpt_idx`` that scores take
        inner products with (preconditioned, projected), e.g. to search a store with
        (:meth:`attrib_torch.store.FeatureStore.topk`, an :class:`attrib_torch.approximate.ApproximateIndex`)."""
        check_loader(test_dataloader, "test_dataloader")
        if isinstance(ckpt_idx, bool) or not isinstance(ckpt_idx, int) or not 0 <= ckpt_idx < len(self.task):
            raise ValueError(f"ckpt_idx: expected an integer in [0, {len(self.task)}), got {ckpt_idx!r}")
        if self.full_train_dataloader is None:
            raise ValueError("test_representations: call cache(train_loader) first (the transforms are fitted there)")
        with untouched(self.task):
            return rep_concat(list(self._grouped(test_dataloader, ckpt_idx, train=False)))

    def _stored_topk(self, test_dataloader: Any, k: int, largest: bool, *, tokens: bool) -> TopK:
        """:meth:`topk` over the stores :meth:`cache` was given: their rows streamed a block at a time (per
        example, a per-token store's rows added up; or, with ``tokens``, the rows of per-token stores as they
        are), never all in memory."""
        from .distributed import gather_topk, world
        from .store import stored_examples, stored_rows

        weights = self.checkpoint_weights()
        stores = [self._stores[c] for c in range(len(weights))]
        n = stores[0].n_rows if tokens else stores[0].n_examples
        if k > n:
            raise ValueError(f"k: expected an integer in [1, {n}] (the training {'tokens' if tokens else 'examples'}"
                             f"), got {k}")
        test = [rep_concat(list(self._grouped(test_dataloader, c, train=False))) for c in range(len(weights))]
        m = rep_rows(test[0])
        scale = None if tokens else self._row_scale(self.full_train_dataloader)
        block = max(k, min(_STORE_BLOCK_ROWS, (1 << 24) // max(m, 1)))
        part = world() if self._distributed else (0, 1)  # a rank scans every world-th block
        if tokens:
            streams = [stored_rows(store, block, part=part) for store in stores]
        else:
            streams = [stored_examples(store, block, part=part) for store in stores]
        running = kernels.empty_topk(m, test[0].dtype, self.device)
        blocks = tqdm(zip(*streams), total=-(-n // block) // part[1], desc="store top-k",
                      disable=not self.show_progress)
        for parts in blocks:
            start = parts[0][0]
            parts = [rows for _, rows in parts]
            scores = None
            for c, (rows, query, weight) in enumerate(zip(parts, test, weights)):
                rows = rows.to(self.device, query.dtype)
                term = weight * rep_inner(rows if tokens else self.transform_stored_rep(c, rows), query)
                scores = term if scores is None else scores + term
            if scale is not None:
                scores = scores * scale[start : start + len(scores), None].to(scores.dtype)
            running = kernels.merge_topk(running, scores.T, start, k, largest=largest)
        return gather_topk(running, k, largest=largest) if part[1] > 1 else running


_STORE_BLOCK_ROWS = 16384  # training rows read from a store and scored at a time


def _qualified_name(func: Any) -> str:
    """``module.qualname`` of a function, or of a callable object's class (a store records its loss by it)."""
    named = func if hasattr(func, "__qualname__") else type(func)
    return f"{getattr(named, '__module__', '?')}.{named.__qualname__}"
