"""Optimizer second moments as a gradient preconditioner (TrackStar, LESS): ``g / sqrt(v)`` per coordinate.

Adam's ``exp_avg_sq`` estimates each coordinate's squared gradient; dividing
gradients by its square root puts them in the geometry the optimizer stepped in
(TrackStar, Chang et al., 2024; LESS, Xia et al., 2024). :func:`adam_second_moments`
reads ``v̂`` (bias-corrected) from a ``torch.optim.Adam``/``AdamW`` state dict.

For gradients kept as layer factors (``Σ_t ds_t a_tᵀ``) an elementwise scaling is
exact only when ``v`` is a rank-one outer product, which is Adafactor's factored
second moment: ``v̂_ij = R_i C_j / Σ R`` (row and column sums). :func:`factored_scales`
fits that form to a layer's ``v`` (exact for Adafactor's, the rank-one fit of
Shazeer & Stern, 2018, for Adam's) and :func:`scale_factors` applies it to the
factors: ``ds ⊙ r^{-1/2}`` and ``a ⊙ c^{-1/2}``, never forming the gradient.
"""

from __future__ import annotations

from typing import Collection, Mapping, Sequence, Tuple

import torch
from torch import Tensor

from .layer_capture import Captured, LayerSpec

__all__ = ["adam_second_moments", "dense_scales", "factored_scales", "scale_factors", "scale_gradient"]


def adam_second_moments(state_dict: Mapping, names: Sequence[str], *, bias_correction: bool = True) -> dict[str, Tensor]:
    """``{name: v̂}``: each parameter's bias-corrected ``exp_avg_sq`` from an Adam/AdamW ``state_dict()``.

    Args:
        state_dict: ``optimizer.state_dict()``.
        names: the parameters' names in the order the optimizer was given them
            (``[n for n, _ in model.named_parameters()]`` for ``Adam(model.parameters())``).
        bias_correction: divide by ``1 - β₂^step`` as Adam's update does.

    Raises:
        ValueError: the state has no ``exp_avg_sq`` (not Adam), or ``names`` does not
            have one entry per parameter of the optimizer.
    """
    groups = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
    if groups is None or "state" not in state_dict:
        raise ValueError("state_dict: expected an optimizer's state_dict() with 'state' and 'param_groups'")
    indices = [i for group in groups for i in group["params"]]
    if len(indices) != len(names):
        raise ValueError(f"names: expected one name per optimizer parameter ({len(indices)}), got {len(names)}")
    out = {}
    for group in groups:
        beta2 = group.get("betas", (0.9, 0.999))[1]
        for i in group["params"]:
            state = state_dict["state"].get(i, {})
            if "exp_avg_sq" not in state:
                raise ValueError(f"state_dict: parameter {names[indices.index(i)]!r} has no exp_avg_sq "
                                 "(not an Adam state, or never stepped)")
            v = state["exp_avg_sq"].detach()
            if bias_correction:
                step = float(state["step"])
                v = v / (1.0 - beta2 ** step)
            out[names[indices.index(i)]] = v
    return out


def dense_scales(moments: Mapping[str, Tensor], names: Sequence[str], eps: float = 1e-8) -> Tensor:
    """``(P,)``: ``1 / (sqrt(v̂) + eps)`` for the flattened parameters ``names``, in order (Adam's own scaling)."""
    missing = [n for n in names if n not in moments]
    if missing:
        raise ValueError(f"moments: no second moment for {missing[:8]}")
    return torch.cat([1.0 / (moments[n].reshape(-1).double().sqrt() + eps) for n in names])


def factored_scales(moments: Mapping[str, Tensor], spec: LayerSpec, eps: float = 1e-8) -> Tuple[Tensor, Tensor]:
    """``(row (d_out,), column (d_a,))`` scales with ``row_i · column_j = 1 / sqrt(v̂_ij + eps)`` for the
    rank-one fit ``v̂_ij = R_i C_j / Σ R`` of the layer's second moments (its bias as the last column).

    Exact for a second moment that is itself rank one (Adafactor's); for Adam's, the
    fit Adafactor makes. ``eps`` is added to both normalised sides (``r_i + eps``,
    ``c_j + eps``) so an all-zero row or column scales by ``1/sqrt(eps)``, not infinity.
    """
    v = spec.as_matrix(moments[spec.weight].reshape(1, -1).double())[0]  # (d_out, d_in)
    if spec.bias is not None:
        v = torch.cat([v, moments[spec.bias].reshape(-1, 1).double()], dim=1)
    rows, columns = v.sum(1), v.sum(0)
    total = rows.sum().clamp(min=torch.finfo(torch.float64).tiny)
    r, c = rows / total.sqrt(), columns / total.sqrt()  # v̂ = r cᵀ
    return 1.0 / (r + eps).sqrt(), 1.0 / (c + eps).sqrt()


def scale_factors(x: Mapping[str, Captured], scales: Mapping[str, Tuple[Tensor, Tensor]], *,
                  indexed: Collection[str] = ()) -> dict[str, Captured]:
    """Each layer's factors scaled: ``ds ⊙ row`` and ``a ⊙ column``, so ``Σ_t ds_t a_tᵀ`` becomes ``G ⊙ (row columnᵀ)``.

    The embeddings in ``indexed`` were captured through :func:`attrib_core.embedding_input_maps`
    given their column scales: only their ``ds`` is scaled here.
    """
    return {m: Captured(c.a if m in indexed else c.a * scales[m][1].to(c.a.dtype),
                        c.ds * scales[m][0].to(c.ds.dtype), c.positions)
            for m, c in x.items()}


def scale_gradient(G: Tensor, spec: LayerSpec, scales: Tuple[Tensor, Tensor]) -> Tensor:
    """Explicit gradients of one layer (flattened as :meth:`LayerSpec.gradient_matrix` reads them) multiplied by
    ``row columnᵀ``: what :func:`scale_factors` does to the factors, for gradients already formed."""
    row, column = (t.to(G.dtype) for t in scales)
    return spec.flat_gradient(spec.gradient_matrix(G) * torch.outer(row, column))
