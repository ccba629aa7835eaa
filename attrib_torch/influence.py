"""Influence-function attributors: ``score[i, j] = g_iᵀ (H + λI)⁻¹ g_j`` (Koh & Liang, 2017).

Each class keeps dattri's name, constructor arguments and defaults, and differs
only in how ``(H + λI)⁻¹`` is applied, each a short composition of
:mod:`attrib_core` solvers. ``H`` is the Hessian of ``loss_func`` on the whole
cached training set (a sum over its batches, never the batches joined into one),
computed once per checkpoint in :meth:`cache`; a test batch is solved once, for all training
examples. A positive score means the training example helps the test prediction.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.func import functional_call

from attrib_core import EKFAC, SpectralProjector, coverage, datainf, ekfac, layer_specs, sample_labels
from attrib_core import rep_concat, rep_rowwise

from .base import BaseInnerProductAttributor
from .checks import nonnegative, positive, positive_int
from .data import Batches, Mapped, check_loader
from .inverses import (
    ArnoldiInverse,
    CGInverse,
    ExplicitInverse,
    InverseSetting,
    LiSSAInverse,
    TrainingLoss,
    solved,
    training_loss,
)
from .task import AttributionTask
from .user_warning import warn

__all__ = [
    "IFAttributorExplicit",
    "IFAttributorCG",
    "IFAttributorLiSSA",
    "IFAttributorDataInf",
    "IFAttributorArnoldi",
    "IFAttributorEKFAC",
]

LayerName = Union[None, str, Sequence[str]]


def _first_batches(loader: Any, ratio: float) -> list:
    """The first ``ceil(ratio · batches)`` batches of a loader, as a list of batches (counted by a pass if unsized)."""
    try:
        total = len(loader)
    except TypeError:  # an IterableDataset: count its batches
        total = sum(1 for _ in loader)
    count = math.ceil(total * ratio)
    return list(itertools.islice(iter(loader), count))


class _FullTrainingLoss(BaseInnerProductAttributor):
    """Shared by the solvers that need the training loss over the whole cached training set."""

    def _training_objective(self, ckpt_idx: int) -> TrainingLoss:
        """The task's loss over the cached loader, batch by batch (see :func:`inverses.training_loss`)."""
        chosen, fixed = self._split_params(ckpt_idx)
        f = self._restricted(self.task.loss_func, fixed)
        return training_loss(f, chosen, self.full_train_dataloader, self.device)


class _RelatIF(_FullTrainingLoss):
    """``attribute(..., relatif_method=...)``: RelatIF's normalised influence (Barshan et al., AISTATS 2020)."""

    def attribute(self, train_dataloader: Any, test_dataloader: Any,
                  relatif_method: Optional[str] = None) -> Tensor:
        """Scores ``(n_train, n_test)``, optionally divided per training example as RelatIF does.

        Args:
            train_dataloader, test_dataloader: as in :meth:`BaseInnerProductAttributor.attribute`.
            relatif_method: None (plain influence), ``"l"`` (divide row ``i`` by
                ``sqrt(g_iᵀ (H + λI)⁻¹ t_i)``, ``t_i`` the target gradient of training
                example ``i``: its self influence) or ``"theta"`` (by ``‖(H + λI)⁻¹ g_i‖``),
                per checkpoint before checkpoints are averaged, as in dattri. A training
                example whose divisor is zero has a zero gradient and keeps scores of zero.

        Raises:
            ValueError: an unknown ``relatif_method``; with ``"l"``, a negative self
                influence (an indefinite Hessian: no real square root; dattri clamps it).
        """
        if relatif_method is None:
            return super().attribute(train_dataloader, test_dataloader)
        if relatif_method not in ("l", "theta"):
            raise ValueError(f"relatif_method: expected None, 'l' or 'theta', got {relatif_method!r}")
        check_loader(train_dataloader, "train_dataloader")
        check_loader(test_dataloader, "test_dataloader")
        self._ensure_cached(train_dataloader)

        def divided(ckpt_idx: int) -> Tensor:
            scale = self._relatif_scale(ckpt_idx, train_dataloader, relatif_method)[:, None]
            scores = self._checkpoint_scores(ckpt_idx, train_dataloader, test_dataloader).double()
            # A zero divisor means a zero gradient, whose scores are zero: they stay zero.
            return torch.where(scale > 0, scores / scale.clamp(min=torch.finfo(torch.float64).tiny), 0.0)

        return self._combined(divided)

    def _relatif_scale(self, ckpt_idx: int, loader: Any, method: str) -> Tensor:
        """``(n_train,)``: RelatIF's divisor of each training example's scores."""
        if method == "theta":  # ‖(H + λI)⁻¹ g_i‖, g_i the loss gradient
            solved = self._grouped(loader, ckpt_idx, train=True, transform=self.transform_test_rep)
            return torch.cat([rows.double().norm(dim=1) for rows in solved])
        pairs = zip(self._grouped(loader, ckpt_idx, train=True), self._grouped(loader, ckpt_idx, train=False))
        self_influence = torch.cat([rep_rowwise(train, test) for train, test in pairs]).double()
        negative = int((self_influence < 0).sum())
        if negative:
            raise ValueError(
                f"relatif_method='l': g_iᵀ (H + λI)⁻¹ t_i is negative for {negative} training examples at checkpoint "
                f"{ckpt_idx} (the Hessian is not positive definite), so it has no real square root; raise "
                "regularization or use relatif_method='theta'"
            )
        return self_influence.sqrt()


class IFAttributorExplicit(_RelatIF):
    """Influence with the exact Hessian: built densely, factored once per checkpoint (Cholesky, or eigh).

    Args:
        task, layer_name, device: see :class:`BaseInnerProductAttributor`.
        regularization: ``λ >= 0`` added to the Hessian's diagonal.

    After :meth:`cache`, ``factors[ckpt_idx]`` is the :class:`attrib_core.ExplicitFactor`
    (method, definiteness, count of negative eigenvalues) of each checkpoint.
    """

    regularization = InverseSetting()

    def __init__(self, task: AttributionTask, layer_name: LayerName = None, device: Optional[str] = "cpu",
                 regularization: float = 0.0, show_progress: bool = True) -> None:
        super().__init__(task, layer_name, device, show_progress)
        self.inverse = ExplicitInverse(regularization)
        self.factors: Dict[int, Any] = {}

    _cache_fields = BaseInnerProductAttributor._cache_fields + ('factors',)

    def _prepare(self, ckpt_idx: int) -> None:
        self.factors[ckpt_idx] = self.inverse.factor(self._training_objective(ckpt_idx))

    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        return solved(self, self.factors[ckpt_idx].solve, test_rep, self.inverse, f"checkpoint {ckpt_idx}")


class IFAttributorCG(_RelatIF):
    """Influence by conjugate gradient on Hessian-vector products, all test examples of a batch at once.

    Args:
        max_iter: CG steps at most (default 10).
        tol: stop when a residual norm is below ``tol`` (absolute, as in dattri).
        mode: ``"rev-rev"`` or ``"rev-fwd"`` Hessian-vector products.
        regularization: ``λ >= 0`` added to the Hessian's diagonal.
    """

    max_iter, tol, mode, regularization = (InverseSetting() for _ in range(4))

    def __init__(self, task: AttributionTask, layer_name: LayerName = None, device: Optional[str] = "cpu",
                 max_iter: int = 10, tol: float = 1e-7, mode: str = "rev-rev", regularization: float = 0.0,
                 show_progress: bool = True) -> None:
        super().__init__(task, layer_name, device, show_progress)
        self.inverse = CGInverse(max_iter, tol, mode, regularization)
        self._solvers: Dict[int, Any] = {}

    _cache_fields = BaseInnerProductAttributor._cache_fields + ('_solvers',)

    def _prepare(self, ckpt_idx: int) -> None:
        self._solvers[ckpt_idx] = self.inverse.fit(self._training_objective(ckpt_idx))

    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        return solved(self, self._solvers[ckpt_idx], test_rep, self.inverse, f"checkpoint {ckpt_idx}")


class IFAttributorLiSSA(_RelatIF):
    """Influence by LiSSA: a stochastic Neumann series on mini-batch Hessians.

    Estimates ``(H + damping · scaling · I)⁻¹`` (see :func:`attrib_core.lissa`). Each
    recursion step draws ``batch_size`` distinct training examples with the
    attributor's ``seed`` (all of them, deterministically, when ``batch_size`` is the
    training set's size); rows whose iterates diverge are reported by a warning.

    Args:
        batch_size: examples per recursion step (default 1).
        num_repeat: independent runs averaged.
        recursion_depth: steps per run.
        damping, scaling: of the recursion (``scaling`` must exceed the largest
            eigenvalue of the mini-batch Hessians).
        mode: Hessian-vector product mode.
        seed: for the mini-batch draws (an addition to dattri's arguments).
    """

    batch_size, num_repeat, recursion_depth, damping, scaling, mode, seed = (InverseSetting() for _ in range(7))

    def __init__(self, task: AttributionTask, layer_name: LayerName = None, device: Optional[str] = "cpu",
                 batch_size: int = 1, num_repeat: int = 1, recursion_depth: int = 5000, damping: float = 0.0,
                 scaling: float = 50.0, mode: str = "rev-rev", seed: int = 0, show_progress: bool = True) -> None:
        super().__init__(task, layer_name, device, show_progress)
        self.inverse = LiSSAInverse(batch_size, num_repeat, recursion_depth, damping, scaling, mode, seed)
        self._solvers: Dict[int, Any] = {}

    _cache_fields = BaseInnerProductAttributor._cache_fields + ('_solvers',)

    def _prepare(self, ckpt_idx: int) -> None:
        self._solvers[ckpt_idx] = self.inverse.fit(self._training_objective(ckpt_idx))

    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        return solved(self, self._solvers[ckpt_idx], test_rep, self.inverse, f"checkpoint {ckpt_idx}")


class IFAttributorDataInf(BaseInnerProductAttributor):
    """Influence with DataInf's closed-form, layer-wise inverse (Kwon et al., ICLR 2024).

    Layers are the modules holding the chosen parameters (a weight with its bias).

    Args:
        regularization: ``λ_l`` for every layer; ``0`` (the default) uses the paper's
            per-layer heuristic ``0.1 · mean_i ‖g_{i,l}‖² / d_l`` (DataInf divides by
            ``λ``, so zero itself is not usable).
        fim_estimate_data_ratio: the fraction of the training loader's batches (the
            first ``ceil(ratio · batches)``, as in dattri) whose gradients estimate
            the layer-wise Fisher; scores still cover every training example.
    """

    def __init__(self, task: AttributionTask, layer_name: LayerName = None, device: Optional[str] = "cpu",
                 regularization: float = 0.0, fim_estimate_data_ratio: float = 1.0,
                 show_progress: bool = True) -> None:
        super().__init__(task, layer_name, device, show_progress)
        self.regularization = nonnegative(regularization, "regularization")
        self.fim_estimate_data_ratio = positive(fim_estimate_data_ratio, "fim_estimate_data_ratio")
        if self.fim_estimate_data_ratio > 1:
            raise ValueError(f"fim_estimate_data_ratio: expected a number in (0, 1], got {fim_estimate_data_ratio!r}")
        _, self.layer_map = task.get_param(0, self.names, layer_split=True)
        params = task.params(0)
        sizes: Dict[int, int] = {}
        for name, layer in zip(self.names, self.layer_map):
            sizes[layer] = sizes.get(layer, 0) + params[name].numel()
        self.layer_sizes = [sizes[layer] for layer in sorted(sizes)]
        self._train_layers: Dict[int, list] = {}

    _cache_fields = BaseInnerProductAttributor._cache_fields + ('_train_layers',)

    def _prepare(self, ckpt_idx: int) -> None:
        if self.fim_estimate_data_ratio == 1:
            grads = self.train_reps(ckpt_idx, self.full_train_dataloader)
        else:  # the first batches, as dattri takes them
            grads = rep_concat(list(self._grouped(_first_batches(self.full_train_dataloader,
                                                                   self.fim_estimate_data_ratio), ckpt_idx,
                                                    train=True)))
        self._train_layers[ckpt_idx] = list(torch.split(grads, self.layer_sizes, dim=1))

    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        damping = None if self.regularization == 0 else self.regularization
        layers = list(torch.split(test_rep, self.layer_sizes, dim=1))
        return torch.cat(datainf(self._train_layers[ckpt_idx], layers, damping=damping).x, dim=1)


class IFAttributorArnoldi(_FullTrainingLoss):
    """Influence through the top eigenpairs of the Hessian (Schioppa et al., AAAI 2022).

    Both representations become ``(Λ + λ)^{-1/2} U g / sqrt(norm_constant)``, so a score
    is ``g_iᵀ U (Λ + λ)⁻¹ Uᵀ g_j / norm_constant``. Negative and tiny eigenvalues are
    dropped (with a warning), never inverted: no NaN.

    Args:
        precompute_data_ratio: fraction of the training set (a seeded random subset)
            whose Hessian is decomposed.
        proj_dim: eigenpairs kept (``<= max_iter``).
        max_iter: Arnoldi iterations (Krylov dimension).
        norm_constant: divides every score (``> 0``).
        tol: breakdown tolerance of the iteration.
        regularization: ``λ >= 0`` added to every eigenvalue.
        seed: of the start vector and the data subset.
    """

    proj_dim, max_iter, tol, regularization, seed, precompute_data_ratio = (InverseSetting() for _ in range(6))

    def __init__(self, task: AttributionTask, layer_name: LayerName = None, device: Optional[str] = "cpu",
                 precompute_data_ratio: float = 1.0, proj_dim: int = 100, max_iter: int = 100,
                 norm_constant: float = 1.0, tol: float = 1e-7, regularization: float = 0.0, seed: int = 0,
                 show_progress: bool = True) -> None:
        super().__init__(task, layer_name, device, show_progress)
        self.inverse = ArnoldiInverse(proj_dim, max_iter, tol, regularization, seed, precompute_data_ratio)
        self.inverse.check_width(sum(task.params(0)[n].numel() for n in self.names))
        self.norm_constant = positive(norm_constant, "norm_constant")
        self._projectors: Dict[int, SpectralProjector] = {}

    _cache_fields = BaseInnerProductAttributor._cache_fields + ('_projectors',)

    def _prepare(self, ckpt_idx: int) -> None:
        projector = self.inverse.fit(self._training_objective(ckpt_idx))
        if projector.n_negative or projector.n_small:
            warn(
                f"checkpoint {ckpt_idx}: of {len(projector.eigenvalues) + projector.n_negative + projector.n_small} "
                f"eigenpairs, dropped {projector.n_negative} negative and {projector.n_small} near-zero ones "
                f"(after regularization {self.regularization})"
            )
        self._projectors[ckpt_idx] = projector

    def _ensure_cached(self, train_dataloader: Any) -> None:
        """Refuse to score before :meth:`cache`, as dattri does: the eigenvectors belong to the full training set."""
        if self.full_train_dataloader is None:
            raise ValueError("IFAttributorArnoldi: call cache(full_train_dataloader) before attribute, "
                             "self_attribute or topk; the Hessian's eigenvectors come from the full training set")
        super()._ensure_cached(train_dataloader)

    def _project(self, ckpt_idx: int, rep: Tensor) -> Tensor:
        return self._projectors[ckpt_idx](rep) / math.sqrt(self.norm_constant)

    def transform_train_rep(self, ckpt_idx: int, train_rep: Tensor) -> Tensor:
        return self._project(ckpt_idx, train_rep)

    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        return self._project(ckpt_idx, test_rep)


def _attention_mask(batch: Any) -> Optional[Tensor]:
    """A dict batch's ``attention_mask`` (padding left out of the K-FAC covariances), else None."""
    return batch.get("attention_mask") if isinstance(batch, Mapping) else None


class IFAttributorEKFAC(BaseInnerProductAttributor):
    """Influence with EK-FAC (George et al., 2018; Grosse et al., 2023), one fit per checkpoint.

    Gradients are taken with respect to the weights (and biases) of the factored
    modules. Works for ensembles (one factor set per checkpoint).

    Args:
        module_name: names of ``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding`` or transformers'
            ``Conv1D`` modules, or None for all of them that can be factored exactly; the
            parameters that leaves out (norms' weights, tied weights, other modules) are
            named in a warning with their share of the model.
        damping: ``λ >= 0`` added to the approximate Fisher (needed when it is singular),
            or ``"heuristic"``: per layer, 0.1 times the mean of its eigenvalues
            (Grosse et al., 2023; kronfluence's choice), fitted with the factors.
        fisher: ``"empirical"`` (the batches' own labels) or ``"sampled"`` (labels drawn
            from the model's predictive distribution, the true Fisher, as kronfluence
            does; this assumes classification batches ``(inputs, ..., labels)`` whose
            model output on ``inputs`` are logits).
        seed: for the sampled labels.
        query_rank: None, or keep each preconditioned test gradient's per-layer matrix at
            its best rank-``query_rank`` approximation (truncated SVD), as kronfluence's
            ``query_gradient_low_rank`` does to store queries of large models as factors;
            an approximation (exact when every layer's matrix has rank ``query_rank`` or less).

    Dict batches with an ``attention_mask`` (Hugging Face's) leave padded positions out
    of the covariances. A ``loss_func`` with ``per_example`` (:class:`attrib_torch.CausalLMLoss`)
    gives every example's factors from one batched pass, for models ``vmap`` cannot trace.
    """

    def __init__(self, task: AttributionTask, module_name: LayerName = None, device: Optional[str] = "cpu",
                 damping: Union[float, str] = 0.0, fisher: str = "empirical", seed: int = 0,
                 query_rank: Optional[int] = None, show_progress: bool = True) -> None:
        self.query_rank = None if query_rank is None else positive_int(query_rank, "query_rank")
        # Frozen parameters are left out unless module_name names their layers.
        candidates = task.params(0) if module_name is not None else task.selected(task.params(0), None)
        specs = layer_specs(task.get_model(), candidates, module_name)  # raises on bad names
        if module_name is None:
            left = coverage(task.get_model(), candidates, specs)
            if left.left_out:
                warn(f"IFAttributorEKFAC: {left.describe()}; EK-FAC attributes through the "
                     f"{len(left.covered)} parameters of {len(specs)} factored layers only")
        covered = {s.weight for s in specs} | {s.bias for s in specs if s.bias is not None}
        names = [n for n in task.params(0) if n in covered]
        super().__init__(task, names, device, show_progress)
        self.module_name = module_name
        self._modules = [s.module for s in specs]
        if isinstance(damping, str) and damping != "heuristic":
            raise ValueError(f"damping: expected a number >= 0 or 'heuristic', got {damping!r}")
        self.damping = damping if damping == "heuristic" else nonnegative(damping, "damping")
        if fisher not in ("empirical", "sampled"):
            raise ValueError(f"fisher: expected 'empirical' or 'sampled', got {fisher!r}")
        self.fisher = fisher
        self.seed = seed
        self.max_iter: Optional[int] = None  # batches the factors are fitted on (None: all)
        self._fits: Dict[int, EKFAC] = {}

    _cache_fields = BaseInnerProductAttributor._cache_fields + ('_fits',)

    def cache(self, full_train_dataloader: Any, max_iter: Optional[int] = None, *,
              distributed: bool = False) -> None:
        """Fit the EK-FAC factors of every checkpoint on the training loader.

        Args:
            full_train_dataloader: the training data.
            max_iter: fit on the first ``max_iter`` batches only (dattri's argument);
                every batch by default. Kept for later implicit re-caching.
            distributed: under ``torch.distributed`` (every rank calling with the same
                loader), each rank fits on every ``world``-th batch and the factors' and
                corrections' statistics are merged across ranks (``all_merge``): every
                rank holds the single process's fit, up to the order of floating-point sums.
        """
        if max_iter is not None:
            self.max_iter = positive_int(max_iter, "max_iter")
        super().cache(full_train_dataloader, distributed=distributed)

    def _prepare(self, ckpt_idx: int) -> None:
        params = {k: v.to(self.device) for k, v in self.task.params(ckpt_idx).items()}
        data = Batches(self.full_train_dataloader, self.device, limit=self.max_iter)  # two passes, one batch held
        if self.fisher == "sampled":  # the same labels on both passes: batch i's draw is seeded by i
            data = Mapped(data, lambda i, batch: self._with_sampled_labels(params, batch, (self.seed, ckpt_idx, i)))
        reduce = None
        if self._distributed:
            from .distributed import RankShare, all_merge

            data, reduce = RankShare(data), all_merge
        fit = ekfac(self.task.get_model(), self.task.loss_func, params, data, layers=self._modules,
                    mask=_attention_mask, reduce=reduce)
        self._fits[ckpt_idx] = fit

    def _with_sampled_labels(self, params, batch, key):
        with torch.no_grad():
            logits = functional_call(self.task.get_model(), params, (batch[0],))
        labels = sample_labels(logits, seed=key)
        return (*batch[:-1], labels.to(batch[-1].device, batch[-1].dtype))

    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        fit = self._fits[ckpt_idx]
        damping = fit.heuristic_damping() if self.damping == "heuristic" else self.damping
        solved = fit.solve(test_rep, damping=damping).x
        return solved if self.query_rank is None else fit.low_rank(solved, self.query_rank)
