"""LoGraAttributor: gradients compressed as they are captured (LoGra, FactGraSS), preconditioned, scored.

Each tracked module's per-example gradient ``Σ_t ds_t a_tᵀ`` is compressed from its
factors (:func:`attrib_core.compress_factors`): the ``d_out × d_in`` gradient is never
formed, only ``k_out · k_in`` numbers per module and example. The factors come from
one batched pass (:func:`attrib_core.capture_examples`): for Hugging Face models give
``loss_func``/``target_func`` a ``per_example`` method (:class:`attrib_torch.CausalLMLoss`).
Scores are ``⟨g̃_train, (F̃ + λI)⁻¹ g̃_test⟩`` with ``F̃`` the second moment of the
compressed training gradients, per module (LoGra's preconditioner in the projected
space), or plain inner products with ``preconditioner="identity"``. Per-token scores
(:meth:`LoGraAttributor.attribute_tokens`) split each training sequence's score over its
positions, padding left out, in a ragged layout.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

import kernels

from attrib_core import (
    compress_factors,
    compress_parameter_gradients,
    compressed_covariances,
    compressed_ekfac,
    compressed_gradients,
    compression,
    coverage,
    embedding_input_maps,
    factored_scales,
    layer_specs,
    per_sample_grad_loop,
    scale_factors,
    scale_gradient,
    token_gradients,
    token_scores,
)
from attrib_core.layer_capture import capture_examples

from .base import BaseInnerProductAttributor
from .checks import nonnegative
from .data import batch_size, batches, check_loader, take
from .guard import untouched
from .per_example import HEAD_EXAMPLES
from .task import AttributionTask, LayerName
from .user_warning import warn

__all__ = ["LoGraAttributor", "TokenScores"]

_PRECONDITIONERS = ("fisher", "ekfac", "identity")


class TokenScores(NamedTuple):
    """Per-token training scores in a ragged layout.

    ``scores[offsets[i] : offsets[i + 1]]`` ``(T_i, n_test)`` are training sequence ``i``'s
    positions (``positions`` holds their indices in the sequence), padding left out;
    summed over its rows they are the sequence's score in :meth:`LoGraAttributor.attribute`.
    """

    scores: Tensor
    offsets: Tensor
    positions: Tensor

    def sequence(self, i: int) -> Tensor:
        """``(T_i, n_test)``: the rows of training sequence ``i``."""
        return self.scores[int(self.offsets[i]) : int(self.offsets[i + 1])]


def _attention_mask(batch: Any) -> Optional[Tensor]:
    return batch.get("attention_mask") if isinstance(batch, Mapping) else None


def _kept(batch: Any, per_position: Tensor) -> Tensor:
    """``(n, T)`` bool: the positions of ``per_position`` ``(n, T, ...)`` the batch's ``attention_mask`` keeps."""
    mask = _attention_mask(batch)
    keep = (torch.ones(per_position.shape[:2], dtype=torch.bool, device=per_position.device) if mask is None
            else mask.to(per_position.device).bool())
    if keep.shape != per_position.shape[:2]:
        raise ValueError(f"attention_mask: shape {tuple(keep.shape)} does not match the "
                         f"{tuple(per_position.shape[:2])} positions of the compressed layers")
    return keep


class LoGraAttributor(BaseInnerProductAttributor):
    """Attribution through gradients compressed at capture time (LoGra; FactGraSS with ``kind="factgrass"``).

    Args:
        task: the :class:`AttributionTask`.
        rank: per side, ``k`` or ``(k_out, k_in)``: each module's gradient becomes
            ``k_out · k_in`` numbers. A side of a module smaller than its rank is kept
            exact (named in a warning).
        module_name: ``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding`` or Conv1D modules, or
            None for every one that can be factored exactly (what that leaves out is
            named in a warning with its share of the parameters). A weight tied between
            layers (GPT-2's input embedding and output layer) is compressed once, the
            layers' parts added. An embedding of any vocabulary size is covered: its
            compressed input rows are gathered from its ids, never formed one-hot.
        kind: ``"logra"`` (dense Rademacher matrices) or ``"factgrass"`` (sparse mask,
            then a sparse JL transform).
        preconditioner: ``"fisher"`` (the damped inverse of the compressed gradients'
            second moment, per module: a ``(k_out k_in)²`` matrix), ``"ekfac"`` (EK-FAC of
            the compressed gradients: Kronecker eigenbases of the compressed factors'
            covariances, eigenvalues corrected to the gradients' second moments in that
            basis, :func:`attrib_core.compressed_ekfac`; ``k_out² + k_in²`` numbers per
            module, for ranks where the full matrix is too large) or ``"identity"``
            (inner products).
        damping: per module, ``λ = damping ×`` the mean eigenvalue of its second moment
            (LogIX's and kronfluence's heuristic is 0.1).
        seed: of the compression; scores depend on it and on nothing else random.
        second_moments: ``{parameter: v̂}`` of the optimizer (from
            :func:`attrib_core.adam_second_moments`): gradients are divided by
            ``sqrt(v̂)`` before compression, through the rank-one (Adafactor) fit of each
            layer's ``v̂`` applied to its factors (:func:`attrib_core.factored_scales`).
        normalize: score cosines of ``(F̃ + λI)^{-1/2} g̃`` on both sides (TrackStar's
            form, Chang et al., 2024) instead of ``⟨g̃_train, (F̃ + λI)⁻¹ g̃_test⟩``.
    """

    def __init__(self, task: AttributionTask, rank: Union[int, Tuple[int, int]] = 16,
                 module_name: LayerName = None, kind: str = "logra", preconditioner: str = "fisher",
                 damping: float = 0.1, seed: int = 0, second_moments: Optional[Mapping[str, Tensor]] = None,
                 normalize: bool = False, device: Optional[str] = "cpu", show_progress: bool = True) -> None:
        if preconditioner not in _PRECONDITIONERS:
            raise ValueError(f"preconditioner: expected one of {_PRECONDITIONERS}, got {preconditioner!r}")
        damping = nonnegative(damping, "damping")
        candidates = task.params(0) if module_name is not None else task.selected(task.params(0), None)
        # embeddings of any size: their input factor is compressed from the ids, never one-hot
        specs = layer_specs(task.get_model(), candidates, module_name, tied=True, one_hot=False)  # raises on bad names
        self.compression, exact = compression(specs, rank, kind=kind, seed=seed)  # raises on bad rank/kind
        if module_name is None:
            left = coverage(task.get_model(), candidates, specs)
            if left.left_out:
                warn(f"LoGraAttributor: {left.describe()}; attributing through the {len(left.covered)} "
                     f"parameters of {len(specs)} compressed layers only")
        if exact:
            warn(f"LoGraAttributor: rank {rank} is at least the dimension of {len(exact)} sides "
                 f"({', '.join(exact[:6])}{' ...' if len(exact) > 6 else ''}); they are kept exact, not projected")
        covered = {s.weight for s in specs} | {s.bias for s in specs if s.bias is not None}
        super().__init__(task, [n for n in task.params(0) if n in covered], device, show_progress)
        self._specs = specs
        self._width = self.compression.width
        self._scales = None
        if second_moments is not None:
            if not isinstance(second_moments, Mapping):
                raise TypeError("second_moments: expected a dict {parameter name: tensor}, as adam_second_moments "
                                f"returns, got {type(second_moments).__name__}")
            missing = [n for n in self.names if n not in second_moments]
            if missing:
                raise ValueError(f"second_moments: no entry for {missing[:8]}")
            self._scales = {s.module: factored_scales(second_moments, s) for s in specs}
        self._input_maps = embedding_input_maps(
            specs, self.compression, None if self._scales is None else {m: c for m, (_, c) in self._scales.items()})
        self._second_moments = None if second_moments is None else {n: second_moments[n] for n in self.names}
        self.normalize = bool(normalize)
        self.rank, self.kind, self.seed = rank, kind, seed
        self.preconditioner, self.damping = preconditioner, damping
        self._checked: set = set()  # functions whose compressed gradients were checked against autograd
        # per checkpoint: the Fisher's (eigenvectors, damped eigenvalues) per block, or (EK-FAC, dampings)
        self._inverses: Dict[int, Any] = {}

    _cache_fields = BaseInnerProductAttributor._cache_fields + ("_inverses",)

    # -- representations ------------------------------------------------------------------

    def _projected(self, ckpt_idx: int, data: Any, which: str) -> dict:
        func = self.task.loss_func if which == "train" else self.task.target_func
        chosen, fixed = self._split_params(ckpt_idx)
        params = {**fixed, **chosen}
        first = which not in self._checked  # later batches: the head check below stands for the broadcast check
        captured = capture_examples(self.task.get_model(), func, params, data, self._specs,
                                    mask=_attention_mask(data), verify_broadcast=first, input_maps=self._input_maps)
        if self._scales is not None:
            captured = scale_factors(captured, self._scales, indexed=self._input_maps)
        projected = compress_factors(captured, self.compression, indexed=self._input_maps)
        if first:
            self._check_head(func, fixed, chosen, data, compressed_gradients(projected, self.compression))
            self._checked.add(which)
        return projected

    def _check_head(self, func, fixed, chosen, data, compressed: Tensor) -> None:
        """The first examples' compressed gradients equal their autograd gradients compressed, or a ValueError."""
        head = take(data, slice(0, min(HEAD_EXAMPLES, batch_size(data))))
        dense = per_sample_grad_loop(lambda c, d: func({**fixed, **c}, d))(chosen, head)
        grads = dict(zip(chosen, dense.split([t.numel() for t in chosen.values()], dim=1)))
        scaled = None if self._scales is None else (lambda G, spec: scale_gradient(G, spec, self._scales[spec.module]))
        expected = compress_parameter_gradients(grads, self._specs, self.compression, transform=scaled)
        expected = expected.to(compressed.dtype)
        got = compressed[: expected.shape[0]]
        error, scale = float((got - expected).norm()), float(expected.norm())
        tolerance = 1e-8 if got.dtype == torch.float64 else 1e-3
        if not error <= tolerance * max(scale, 1e-30):
            raise ValueError(
                f"LoGraAttributor: the compressed gradients from layer factors differ from autograd's on the first "
                f"examples (relative error {error / max(scale, 1e-30):.1e}): the loss reads a compressed weight "
                "outside its layer, or its per_example losses are not its loss on a batch of one")

    def generate_train_rep(self, ckpt_idx: int, data: Any) -> Tensor:
        """Compressed per-example loss gradients ``(B, Σ k_out · k_in)``."""
        return compressed_gradients(self._projected(ckpt_idx, data, "train"), self.compression)

    def generate_test_rep(self, ckpt_idx: int, data: Any) -> Tensor:
        """Compressed per-example target gradients ``(B, Σ k_out · k_in)``."""
        return compressed_gradients(self._projected(ckpt_idx, data, "test"), self.compression)

    def stored_token_rep(self, ckpt_idx: int, data: Any) -> Any:
        """A per-token store's rows of a training batch: each kept position's compressed gradient term
        ``ds'_t a'_tᵀ`` (:func:`attrib_core.token_gradients`), padding left out; an example's rows add up to its
        row of :meth:`generate_train_rep`."""
        from .store import TokenRows

        if self.normalize:
            raise ValueError("per_token: with normalize=True a score is a cosine of whole gradients, which does not "
                             "split over positions; build per-token stores with normalize=False")
        terms = token_gradients(self._projected(ckpt_idx, data, "train"), self.compression)
        keep = _kept(data, terms)
        return TokenRows(terms[keep], keep.sum(1).cpu(), keep.nonzero()[:, 1].to(torch.int32).cpu())

    def store_description(self, ckpt_idx: int) -> Dict[str, Any]:
        """The base's, with the compression (kind, seed, per-block dims and masks) and the second moments' digest."""
        from .store import fingerprint_state

        return {**super().store_description(ckpt_idx), **self.compression.description(),
                "second_moments": None if self._second_moments is None else fingerprint_state(self._second_moments)}

    # -- preconditioner ---------------------------------------------------------------------

    def _prepare(self, ckpt_idx: int) -> None:
        """One pass over the cached training set: its compressed gradients, the preconditioner fitted on them, and
        the transformed training representations kept for scoring."""
        loader = self.full_train_dataloader
        if self.preconditioner == "ekfac":
            if ckpt_idx in self._stores:
                raise ValueError("stores: preconditioner='ekfac' fits on the compressed factors of every position, "
                                 "which a store of compressed gradients does not hold; use 'fisher' or 'identity'")
            raw = self._fit_ekfac(ckpt_idx, loader)
        elif self.preconditioner == "identity" and ckpt_idx in self._stores:
            return  # nothing to fit, and scoring reads the store (train_reps), one block at a time
        else:
            stored = ckpt_idx in self._stores  # then the rows stay on disk: the fit streams them
            shared = stored and self._distributed  # each rank sums its share of the stored rows
            sums, n, kept = None, 0, []
            for rows in self._grouped(loader, ckpt_idx, train=True, transform=lambda c, rep: rep, share=shared):
                part = self._second_moment_sums(rows)
                sums = part if sums is None else [a + b for a, b in zip(sums, part)]
                n += rows.shape[0]
                if not stored:
                    kept.append(rows)
            if shared:  # the ranks' sums added up: every rank fits the same preconditioner
                from .distributed import all_sum

                if sums is None:  # more ranks than groups of rows
                    sums = [torch.zeros(k * l, k * l, dtype=torch.float64, device=self.device)
                            for k, l in self.compression.dims.values()]
                *sums, total = all_sum([*sums, torch.tensor(float(n), dtype=torch.float64, device=self.device)])
                n = int(total)
            if self.preconditioner == "fisher":
                self._inverses[ckpt_idx] = self._fit(sums, n)
            if stored:
                return  # scoring reads the store again (train_reps), one block at a time
            raw = torch.cat(kept)
        self._keep_train_reps(ckpt_idx, loader, self.transform_train_rep(ckpt_idx, raw))

    def _second_moment_sums(self, rows: Tensor) -> List[Tensor]:
        """Per block, ``Σ g̃ g̃ᵀ`` over the rows (float64)."""
        sums, start = [], 0
        for k_out, k_in in self.compression.dims.values():
            block = rows[:, start : start + k_out * k_in].double()
            start += k_out * k_in
            sums.append(block.T @ block)
        return sums

    def _fit_ekfac(self, ckpt_idx: int, loader: Any) -> Tensor:
        """The training set's compressed gradients, with EK-FAC fitted on their factors in the same pass."""
        raw, covariances = [], None
        for batch in batches(loader, self.device, desc=f"train gradients, checkpoint {ckpt_idx}",
                             show_progress=self.show_progress):
            projected = self._projected(ckpt_idx, batch, "train")
            sums = compressed_covariances(projected, self.compression)
            covariances = sums if covariances is None else {b: (covariances[b][0] + S, covariances[b][1] + A)
                                                            for b, (S, A) in sums.items()}
            raw.append(compressed_gradients(projected, self.compression))
        raw = torch.cat(raw)
        fit = compressed_ekfac(covariances, raw, self.compression)
        if self.damping <= 0 and any(bool((layer.eigenvalues <= 0).any()) for layer in fit.layers):
            raise ValueError("damping: the compressed gradients' EK-FAC has eigenvalues 0; give damping > 0")
        self._inverses[ckpt_idx] = (fit, fit.heuristic_damping(self.damping))
        return raw

    def _fit(self, sums: List[Tensor], n: int) -> List[Tuple[Tensor, Tensor]]:
        """Per block, the eigenvectors and damped eigenvalues of the compressed gradients' second moment, from
        the sums of their outer products over ``n`` examples."""
        inverses = []
        for total in sums:
            values, vectors = torch.linalg.eigh(total / n)
            values = values.clamp(min=0)
            damping = self.damping * float(values.mean())
            if damping <= 0 and not bool((values > 0).all()):
                raise ValueError("damping: the compressed gradients' second moment is singular; give damping > 0")
            inverses.append((vectors, values + damping))
        return inverses

    def _powered(self, ckpt_idx: int, rep: Tensor, power: float) -> Tensor:
        """``(F̃ + λI)^power`` applied block by block to the rows of ``rep``."""
        if self.preconditioner == "ekfac":
            fit, dampings = self._inverses[ckpt_idx]
            return fit.power(rep, power, damping=dampings).to(rep.dtype)
        out, start = [], 0
        for vectors, values in self._inverses[ckpt_idx]:
            width = vectors.shape[0]
            block = rep[:, start : start + width].double()
            start += width
            out.append(((block @ vectors) * values.pow(power)) @ vectors.T)
        return torch.cat(out, dim=1).to(rep.dtype)

    def _transformed(self, ckpt_idx: int, rep: Tensor, test: bool) -> Tensor:
        if self.normalize:
            if self.preconditioner != "identity":
                rep = self._powered(ckpt_idx, rep, -0.5)
            return rep / rep.norm(dim=1, keepdim=True).clamp(min=torch.finfo(rep.dtype).tiny)
        if test and self.preconditioner != "identity":
            return self._powered(ckpt_idx, rep, -1.0)
        return rep

    def transform_train_rep(self, ckpt_idx: int, train_rep: Tensor) -> Tensor:
        return self._transformed(ckpt_idx, train_rep, test=False)

    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        return self._transformed(ckpt_idx, test_rep, test=True)

    # -- per-token scores ---------------------------------------------------------------------

    def attribute_tokens(self, train_dataloader: Any, test_dataloader: Any) -> TokenScores:
        """Each training position's share of the scores against every test example, ragged.

        Position ``t``'s share is ``Σ_modules (R_outᵀ ds_t)ᵀ Q (R_inᵀ a_t)``, ``Q`` the test
        example's compressed (preconditioned) gradient: the term of position ``t`` in the
        sequence's gradient ``Σ_t ds_t a_tᵀ`` (kronfluence's and bergson's per-token
        scores). Positions where the batch's ``attention_mask`` is 0 are left out; the
        rows of a sequence sum to its score in :meth:`attribute`. Costs one more pass
        over the training data (none where :meth:`cache` was given per-token stores: their
        rows are read, a block at a time); the ``(n_train, T, n_test)`` tensor is never formed.
        """
        check_loader(train_dataloader, "train_dataloader")
        check_loader(test_dataloader, "test_dataloader")
        self._ensure_cached(train_dataloader)
        with untouched(self.task):
            weights = self.checkpoint_weights()
            queries = [torch.cat(list(self._grouped(test_dataloader, c, train=False))) for c in range(len(weights))]
            stores = [self._stores.get(c) for c in range(len(weights))]
            if train_dataloader is self.full_train_dataloader and all(s is not None and s.per_token for s in stores):
                return self._stored_token_scores(stores, queries, weights)
            rows, counts, positions = [], [], []
            for batch in batches(train_dataloader, self.device, desc="per-token scores",
                                 show_progress=self.show_progress):
                total = None
                for c, weight in enumerate(weights):
                    part = weight * token_scores(self._projected(c, batch, "train"), queries[c], self.compression)
                    total = part if total is None else total + part
                keep = _kept(batch, total)
                rows.append(total[keep])
                counts.append(keep.sum(1).cpu())
                positions.append(keep.nonzero()[:, 1].cpu())
        counts = torch.cat(counts)
        offsets = torch.zeros(len(counts) + 1, dtype=torch.long)
        offsets[1:] = counts.cumsum(0)
        return TokenScores(torch.cat(rows), offsets, torch.cat(positions))

    def topk_tokens(self, test_dataloader: Any, k: int, proponents: bool = True) -> kernels.TopK:
        """For each test example, the ``k`` training positions with the largest (or smallest) share of its score:
        exact, streamed over the per-token stores :meth:`cache` was given (one per checkpoint, from
        ``build_store(..., per_token=True)``), a block of rows at a time.

        Indices are rows of the stores; ``store.locate(indices)`` gives their sequences and positions.
        """
        check_loader(test_dataloader, "test_dataloader")
        if self.normalize:
            raise ValueError("topk_tokens: with normalize=True a score is a cosine of whole gradients, which does not "
                             "split over positions")
        stores = [self._stores.get(c) for c in range(len(self.task))]
        if not all(store is not None and store.per_token for store in stores):
            raise ValueError("topk_tokens: call cache(train_loader, stores=[...]) with a per-token store per "
                             "checkpoint first (build_store(path, dataset, per_token=True))")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected an integer >= 1, got {k!r}")
        _same_positions(stores)
        with untouched(self.task):
            return self._stored_topk(test_dataloader, k, proponents, tokens=True)

    def _stored_token_scores(self, stores: List[Any], queries: List[Tensor], weights: List[float]) -> TokenScores:
        """:meth:`attribute_tokens` from per-token stores (one per checkpoint, rows of the same positions)."""
        if self.normalize:
            raise ValueError("attribute_tokens: with normalize=True a score is a cosine of whole gradients; per-token "
                             "stores hold the positions' raw terms")
        offsets, positions = _same_positions(stores), stores[0].column("positions").long()
        scores = torch.zeros(stores[0].n_rows, queries[0].shape[0], dtype=queries[0].dtype, device=self.device)
        from .store import stored_rows

        for store, query, weight in zip(stores, queries, weights):
            for start, block in stored_rows(store, _TOKEN_BLOCK_ROWS):
                block = block.to(self.device, query.dtype)
                scores[start : start + len(block)] += weight * (block @ query.T)
        return TokenScores(scores, offsets, positions)


_TOKEN_BLOCK_ROWS = 8192  # token rows read from a per-token store at a time


def _same_positions(stores: List[Any]) -> Tensor:
    """The stores' token offsets, which must be the same in every one (the same sequences, the same positions)."""
    offsets = stores[0].token_offsets()
    for c, store in enumerate(stores[1:], start=1):
        if not torch.equal(store.token_offsets(), offsets):
            raise ValueError(f"stores[{c}]: its sequences keep other positions than stores[0]'s")
    return offsets
