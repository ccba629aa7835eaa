"""attrib_core: the functional core of the attribution library.

Pure functions in the style of JAX: per-sample gradients, curvature operators,
iterative solvers written as folds over NamedTuple state. Nothing here keeps
state between calls. See ``DESIGN.md`` for the conventions (parameters as
``dict[str, Tensor]``, operators as ``mv(V)`` on ``(k, P)`` blocks, explicit seeds).
"""

from .ablation import Ablation, ablate, layer_ablation, prepare_ablation
from .accumulators import (
    Accumulator,
    SumState,
    accumulate,
    batch_sum,
    full_gnvp,
    full_hessian,
    full_hvp,
    gnvp_sum,
    hessian_sum,
    hvp_sum,
    second_moments,
)
from .arnoldi import ArnoldiResult, ArnoldiState, SpectralProjector, arnoldi, spectral_projector
from .cg import CGState, cg
from .curvature import fvp, gnvp, hessian, hvp, make_fvp, make_gnvp, make_hvp, saved_activation_bytes
from .datainf import datainf, datainf_damping
from .diagonal import hutchinson_diagonal, jacobi
from .factored import (
    concat_captured,
    factored_cost,
    factored_dense,
    factored_inner,
    factored_rowwise,
    factored_sq_norms,
)
from .fold import fold
from .gradients import per_sample_grad, per_sample_grad_loop
from .kfac import (
    EKFAC,
    CorrectionState,
    EKFACLayer,
    KFACFactors,
    KFACState,
    LayerFactors,
    ekfac,
    ekfac_correction,
    kfac_accumulator,
    kfac_factors,
)
from .two_sided import project_factors, project_gradient, side_seed
from .layer_capture import Captured, DirectParameterUse, LayerSpec, capture, capture_per_example, layer_specs
from .lissa import LissaState, lissa
from .metrics import (
    BrittlenessResult,
    LDSResult,
    LOOResult,
    MislabelResult,
    brittleness,
    lds,
    loo_correlation,
    mislabel_auc,
)
from .nystrom import NystromApprox, nystrom
from .projector import Projector, projector
from .representer import (
    fit_final_layer,
    label_columns,
    representer_scores,
    representer_self_scores,
    representer_targets,
    representer_weights,
)
from .representations import (
    Representation,
    factored_plan,
    rep_concat,
    rep_inner,
    rep_normalized,
    rep_rows,
    rep_rowwise,
    rep_slice,
)
from .sampled_fisher import sample_labels
from .scores import TopK, cosine, inner_products, self_scores, topk_scores
from .solution import Factorisation, Solution, Status
from .solve_explicit import ExplicitFactor, factor_explicit, solve_explicit
from .trak import trak_kernel, trak_train_features, trak_weights
from .trees import examples_in, ravel, select, split_by_module

__all__ = [
    "ravel",
    "examples_in",
    "select",
    "split_by_module",
    "per_sample_grad",
    "per_sample_grad_loop",
    "hvp",
    "make_hvp",
    "gnvp",
    "make_gnvp",
    "fvp",
    "make_fvp",
    "hessian",
    "saved_activation_bytes",
    "Accumulator",
    "SumState",
    "accumulate",
    "batch_sum",
    "hessian_sum",
    "hvp_sum",
    "gnvp_sum",
    "second_moments",
    "full_hvp",
    "full_gnvp",
    "full_hessian",
    "fold",
    "Solution",
    "Status",
    "Factorisation",
    "solve_explicit",
    "factor_explicit",
    "ExplicitFactor",
    "cg",
    "CGState",
    "lissa",
    "LissaState",
    "arnoldi",
    "ArnoldiState",
    "ArnoldiResult",
    "spectral_projector",
    "SpectralProjector",
    "datainf",
    "datainf_damping",
    "kfac_factors",
    "sample_labels",
    "kfac_accumulator",
    "KFACState",
    "ekfac_correction",
    "CorrectionState",
    "KFACFactors",
    "LayerFactors",
    "ekfac",
    "EKFAC",
    "EKFACLayer",
    "capture",
    "capture_per_example",
    "DirectParameterUse",
    "Captured",
    "layer_specs",
    "LayerSpec",
    "factored_inner",
    "factored_rowwise",
    "factored_sq_norms",
    "factored_dense",
    "factored_cost",
    "concat_captured",
    "Representation",
    "rep_rows",
    "rep_concat",
    "rep_slice",
    "rep_inner",
    "rep_rowwise",
    "rep_normalized",
    "factored_plan",
    "project_factors",
    "project_gradient",
    "side_seed",
    "nystrom",
    "NystromApprox",
    "jacobi",
    "hutchinson_diagonal",
    "projector",
    "Projector",
    "inner_products",
    "cosine",
    "topk_scores",
    "self_scores",
    "TopK",
    "fit_final_layer",
    "representer_weights",
    "representer_targets",
    "label_columns",
    "representer_scores",
    "representer_self_scores",
    "trak_kernel",
    "trak_train_features",
    "trak_weights",
    "lds",
    "LDSResult",
    "loo_correlation",
    "LOOResult",
    "mislabel_auc",
    "MislabelResult",
    "brittleness",
    "BrittlenessResult",
    "Ablation",
    "prepare_ablation",
    "ablate",
    "layer_ablation",
]
