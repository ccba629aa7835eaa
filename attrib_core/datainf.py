"""DataInf: a closed-form, layer-wise inverse of the damped empirical Fisher."""

from __future__ import annotations

import numbers
from typing import Mapping, Sequence, Union

import torch
from torch import Tensor

from ._checks import as_block, check_finite
from .solution import Solution, Status, solution

__all__ = ["datainf", "datainf_damping"]

LayerTensors = Union[Mapping[str, Tensor], Sequence[Tensor]]
Damping = Union[None, float, Sequence[float], Mapping[str, float]]


def datainf_damping(layer_grads: LayerTensors) -> LayerTensors:
    """The DataInf paper's per-layer damping, ``λ_l = 0.1 · (n d_l)⁻¹ Σ_i ‖g_{i,l}‖²``.

    That is one tenth of the mean eigenvalue of the layer's empirical Fisher
    ``G_l = (1/n) Σ_i g_{i,l} g_{i,l}ᵀ`` (its trace over ``d_l``), as in Kwon et al.
    (ICLR 2024), who follow Grosse et al. (2023).
    """
    keys, grads = _layers(layer_grads, "layer_grads")
    return _like(layer_grads, keys, [_heuristic(g) for g in grads])


def _heuristic(g: Tensor) -> Tensor:
    g = g.to(torch.promote_types(g.dtype, torch.float32))  # squares of fp16 gradients overflow
    return 0.1 * g.pow(2).sum(1).mean() / g.shape[1]


def datainf(layer_grads: LayerTensors, B: LayerTensors, *, damping: Damping = None) -> Solution:
    """Apply DataInf's approximation of ``(G_l + λ_l I)⁻¹`` to ``B``, layer by layer.

    Kwon, Wu, Wu & Zou, "DataInf: Efficiently Estimating Data Influence in
    LoRA-tuned LLMs and Diffusion Models" (ICLR 2024). With ``g_i`` the training
    gradients of layer ``l`` and ``G_l = (1/n) Σ_i g_i g_iᵀ``, it swaps the order
    of inversion and averaging (exact by Sherman-Morrison for each rank-one term):

        (G_l + λ I)⁻¹ v ≈ (1 / (n λ)) Σ_i (v - g_i (g_iᵀ v) / (λ + ‖g_i‖²)),

    which costs ``O(n k P_l)`` and never forms a ``(P_l, P_l)`` matrix.

    Args:
        layer_grads: per-layer training gradients ``(n, P_l)``, a dict or a list.
        B: per-layer right-hand sides ``(k, P_l)`` (or ``(P_l,)``), in the same
            structure (same keys, or same length), the same ``k`` for every layer.
        damping: ``λ``: one number for all layers, one per layer (a list, or a dict
            by layer name), or None for the paper's heuristic
            (:func:`datainf_damping`). Every ``λ_l`` must be ``> 0``: the formula
            divides by it.

    Returns:
        :class:`Solution` whose ``x`` holds, per layer, the approximate inverse applied to
        ``B`` (``k, P_l``), in ``B``'s structure; ``status`` is ``CONVERGED`` (a closed form)
        and ``stats["damping"]`` the ``λ_l`` used for each layer (the heuristic's value
        when none was given), in the same structure.
    """
    keys, grads = _layers(layer_grads, "layer_grads")
    v_keys, vectors = _layers(B, "B", allow_vector=True)
    if v_keys != keys:
        raise ValueError(f"B: expected the layers {keys} of layer_grads, got {v_keys}")
    if len({v.shape[0] if v.dim() == 2 else None for v in vectors}) != 1:
        raise ValueError(f"B: every layer needs the same right-hand sides, got shapes {[tuple(v.shape) for v in vectors]}")
    lambdas = _damping_values(damping, keys, grads)
    solved = []
    for key, g, v, lam in zip(keys, grads, vectors, lambdas):
        block, single = as_block(v, g.shape[1], name=f"B[{key!r}]")
        dtype = torch.promote_types(torch.promote_types(g.dtype, block.dtype), torch.float32)
        g, block = g.to(dtype), block.to(dtype)
        n = g.shape[0]
        coef = (block @ g.T) / (lam + g.pow(2).sum(1))  # (k, n): (g_iᵀ v) / (λ + ‖g_i‖²)
        x = (block - coef @ g / n) / lam
        solved.append(x[0] if single else x)
    lambda_tensors = [torch.as_tensor(lam, dtype=x.dtype) for lam, x in zip(lambdas, solved)]
    return solution(_like(layer_grads, keys, solved), Status.CONVERGED, 0, single=single, like=block,
                    damping=_like(layer_grads, keys, lambda_tensors))


def _layers(tree: LayerTensors, name: str, allow_vector: bool = False) -> tuple[list, list[Tensor]]:
    if isinstance(tree, Mapping):
        keys, values = list(tree.keys()), list(tree.values())
    elif isinstance(tree, (list, tuple)):
        keys, values = list(range(len(tree))), list(tree)
    else:
        raise TypeError(f"{name}: expected a dict or a list of per-layer tensors, got {type(tree).__name__}")
    if not values:
        raise ValueError(f"{name}: no layers given")
    for key, value in zip(keys, values):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}[{key!r}]: expected a tensor, got {type(value).__name__}")
        dims = (1, 2) if allow_vector else (2,)
        if value.dim() not in dims or value.shape[0] == 0:
            raise ValueError(
                f"{name}[{key!r}]: expected a non-empty tensor of shape (n, P_l), got {tuple(value.shape)}"
            )
        check_finite(value, f"{name}[{key!r}]")
    return keys, values


def _damping_values(damping: Damping, keys: list, grads: list[Tensor]) -> list[float]:
    if damping is None:
        values = [float(_heuristic(g)) for g in grads]
        zero = [k for k, v in zip(keys, values) if not v > 0]
        if zero:
            raise ValueError(
                f"damping: the heuristic gives 0 for layers {zero} (all their gradients are zero); "
                "pass a positive damping"
            )
        return values
    if isinstance(damping, numbers.Real) and not isinstance(damping, bool):
        values = [float(damping)] * len(keys)
    elif isinstance(damping, Mapping):
        missing = [k for k in keys if k not in damping]
        if missing:
            raise ValueError(f"damping: no value for layers {missing}")
        values = [float(damping[k]) for k in keys]
    elif isinstance(damping, (list, tuple)):
        if len(damping) != len(keys):
            raise ValueError(f"damping: expected {len(keys)} values, one per layer, got {len(damping)}")
        values = [float(d) for d in damping]
    else:
        raise TypeError(f"damping: expected None, a number, or one per layer, got {type(damping).__name__}")
    bad = [(k, v) for k, v in zip(keys, values) if not 0 < v < float("inf")]
    if bad:
        raise ValueError(
            f"damping: every λ_l must be finite and > 0 (DataInf divides by it), got {bad}; "
            "pass None for the paper's heuristic"
        )
    return values


def _like(template: LayerTensors, keys: list, values: list) -> LayerTensors:
    if isinstance(template, Mapping):
        return dict(zip(keys, values))
    return type(template)(values) if isinstance(template, tuple) else list(values)
