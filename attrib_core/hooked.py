"""Per-example gradients from module hooks in one batched backward pass, for models ``vmap`` cannot trace.

Given per-example losses ``f_each(params, batch) -> (B,)``, one forward pass records
each hooked module's input, adds a zero probe to its output, and one backward pass
of ``Σ_i f_each_i`` gives every example's output gradients ``ds_i`` (examples do not
mix in the forward pass of a model in eval mode). Each parameter's per-example
gradient follows from its module's rule:

- Linear, Hugging Face's Conv1D, Conv2d (unfolded): ``Σ_t ds_t a_tᵀ``, bias ``Σ_t ds_t``;
- Embedding: ``ds_t`` added into the row of token ``t`` (the padding row gets none);
- LayerNorm and RMSNorm: ``Σ_t ds_t ⊙ n(x_t)`` with ``n`` the normalisation without
  its affine part, bias ``Σ_t ds_t``.

A weight used by several modules (tied input and output embeddings) gets the sum of
their contributions. Parameters no module rule covers are named by
:func:`hooked_layout` (:class:`UncoveredParameters`) before anything is computed.
That ``f_each`` really gives each example's loss as a batch of one, and that the
model reads its weights only through the hooked modules, is the caller's to check
(``attrib_torch`` compares the first examples with a plain loop of autograd calls).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._checks import check_finite_params
from .layer_capture import LayerSpec, _positions, layer_kind, probed_pass
from .trees import examples_in

__all__ = ["HookedModule", "HookedLayout", "UncoveredParameters", "hooked_layout", "hooked_grads", "norm_kind"]


class UncoveredParameters(ValueError):
    """Parameters that no hooked module's rule gives a per-example gradient for."""


class HookedModule(NamedTuple):
    """A module a named parameter is used through: its path, kind, and the parameter names of its weight and bias."""

    module: str
    kind: str
    weight: Optional[str]
    bias: Optional[str]


class HookedLayout(NamedTuple):
    """The parameters (in output order) and the modules whose hooks give their gradients."""

    names: tuple[str, ...]
    modules: tuple[HookedModule, ...]


def norm_kind(module: nn.Module) -> Optional[str]:
    """``"layernorm"`` (``nn.LayerNorm`` with its affine part), ``"rmsnorm"`` (``nn.RMSNorm``, or a class named
    ``*RMSNorm`` with a 1-D weight and an ``eps`` or ``variance_epsilon``, as Llama's and Gemma's), or None."""
    if isinstance(module, nn.LayerNorm):
        return "layernorm" if module.elementwise_affine else None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 1:
        return None
    if isinstance(module, getattr(nn, "RMSNorm", ())) or (
            type(module).__name__.endswith("RMSNorm") and any(hasattr(module, a) for a in ("eps", "variance_epsilon"))):
        return "rmsnorm"
    return None


def _kind(module: nn.Module) -> Optional[str]:
    kind = layer_kind(module)
    if kind == "embedding" and (module.max_norm is not None or module.scale_grad_by_freq):
        return None  # renormalised rows or count-scaled gradients: no plain rule
    if kind == "conv2d" and (module.groups != 1 or module.padding_mode != "zeros"):
        return None
    return kind if kind is not None else norm_kind(module)


def hooked_layout(model: nn.Module, names: Sequence[str]) -> HookedLayout:
    """The modules through which the parameters ``names`` (as ``model.named_parameters()`` names them) are used.

    Raises:
        UncoveredParameters: naming each parameter no module rule covers (a raw
            ``nn.Parameter``, a module of another type, an embedding with
            ``max_norm``), with their share of the named entries.
        ValueError: a name that is not a parameter of ``model``.
    """
    canonical = {id(p): n for n, p in model.named_parameters()}
    by_name = dict(model.named_parameters())
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"names: {unknown[:8]} are not parameters of the model")
    wanted = set(names)
    modules, covered, foreign = [], set(), {}
    for path, module in model.named_modules(remove_duplicate=False):
        owned = {attr: canonical.get(id(p)) for attr, p in module._parameters.items() if p is not None}
        owned = {attr: n for attr, n in owned.items() if n in wanted}
        if not owned:
            continue
        kind = _kind(module)
        rule = {"weight", "bias"} if kind is not None else set()
        for attr, n in owned.items():
            if attr not in rule:
                foreign.setdefault(n, f"{type(module).__name__} {path!r}" if path else
                                   f"the top-level {type(module).__name__}")
        if kind is not None and owned.keys() & rule:
            modules.append(HookedModule(path, kind, owned.get("weight"), owned.get("bias")))
            covered.update(n for attr, n in owned.items() if attr in rule)
    left = [n for n in names if n not in covered or n in foreign]
    if left:
        total = sum(by_name[n].numel() for n in names)
        share = sum(by_name[n].numel() for n in left) / max(total, 1)
        detail = ", ".join(f"{n} (in {foreign.get(n, 'no module')})" for n in left[:8])
        more = f" and {len(left) - 8} more" if len(left) > 8 else ""
        raise UncoveredParameters(
            f"{len(left)} parameters ({100 * share:.1f}% of the attributed entries) have no per-example rule "
            f"from hooks: {detail}{more}; rules exist for Linear, Conv1D, Conv2d, Embedding, LayerNorm and RMSNorm"
        )
    return HookedLayout(tuple(names), tuple(modules))


def hooked_grads(
    model: nn.Module,
    f_each: Callable[[Mapping[str, Tensor], Any], Tensor],
    params: Mapping[str, Tensor],
    batch: Any,
    layout: HookedLayout,
) -> Tensor:
    """``(B, P)``: per-example gradients of ``f_each`` (``(B,)`` losses) for ``layout.names``, in that order.

    Each parameter is flattened in its own layout, as :func:`attrib_core.per_sample_grad`
    flattens it; float32 or wider.

    Raises:
        ValueError: ``f_each`` does not return one loss per example, a hooked module
            did not run, or its output is shared by the batch in a way that changes
            the loss when each example gets its own.
    """
    check_finite_params(params)
    examples = examples_in(batch)
    named = dict(model.named_modules(remove_duplicate=False))
    detached = {k: v.detach() for k, v in params.items()}

    def checked(p: Mapping[str, Tensor], b: Any) -> Tensor:
        losses = f_each(p, b)
        if not isinstance(losses, Tensor) or losses.shape != (examples,):
            raise ValueError(f"f_each: expected one loss per example, shape ({examples},), got "
                             f"{tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__}")
        return losses

    paths = [m.module for m in layout.modules]
    _, inputs, grads = probed_pass(model, checked, detached, batch, paths)
    wide = torch.promote_types(next(iter(params.values())).dtype, torch.float32)
    parts: dict[str, Tensor] = {}
    for m, ds in zip(layout.modules, grads):
        x = inputs[m.module]
        for name, value in _module_grads(m, named[m.module], x.to(wide) if x.is_floating_point() else x,
                                         ds.to(wide), examples, detached).items():
            value = value.reshape(examples, -1)
            parts[name] = value if name not in parts else parts[name] + value
    return torch.cat([parts[n] for n in layout.names], dim=1)


def _rows(x: Tensor, examples: int, features: int, what: str) -> Tensor:
    """``x`` as ``(B, positions, features)``: its leading rows are examples or example-major tokens."""
    if x.shape[0] % examples:
        raise ValueError(f"module {what!r}: its input has {x.shape[0]} rows, not a multiple of the batch's "
                         f"{examples} examples")
    return x.reshape(examples, -1, features)


def _module_grads(m: HookedModule, module: nn.Module, x: Tensor, ds: Tensor, examples: int,
                  params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    if m.kind in ("layernorm", "rmsnorm"):
        shape = tuple(module.weight.shape)
        n = _normalised(m.kind, module, x)
        width = int(torch.Size(shape).numel())
        dsr = _rows(ds, examples, width, m.module)
        if m.weight is not None:
            out[m.weight] = (dsr * _rows(n, examples, width, m.module)).sum(1)
        if m.bias is not None:
            out[m.bias] = dsr.sum(1)
        return out
    if m.kind == "embedding":
        ids = x.reshape(examples, -1).long()
        rows, width = module.num_embeddings, ds.shape[-1]
        dsr = ds.reshape(examples, -1, width)
        flat = (ids + rows * torch.arange(examples, device=ids.device).unsqueeze(1)).reshape(-1)
        grad = torch.zeros(examples * rows, width, dtype=ds.dtype, device=ds.device)
        grad.index_add_(0, flat, dsr.reshape(-1, width))
        grad = grad.reshape(examples, rows, width)
        if module.padding_idx is not None:
            grad[:, module.padding_idx] = 0
        out[m.weight] = grad
        return out
    weight_name = m.weight or f"{m.module}.weight"
    shape = params[m.weight].shape if m.weight is not None else module.weight.shape
    d_in, d_out = (shape[0], shape[1]) if m.kind == "conv1d" else (shape[1:].numel(), shape[0])
    spec = LayerSpec(m.module, m.kind, weight_name, None, int(d_in), int(d_out))
    a, g = _positions(spec, module, x, ds)
    a, g = _rows(a, examples, a.shape[-1], m.module), _rows(g, examples, g.shape[-1], m.module)
    if m.weight is not None:
        out[m.weight] = spec.as_weight(torch.einsum("ntd,nta->nda", g, a))
    if m.bias is not None:
        out[m.bias] = g.sum(1)
    return out


def _normalised(kind: str, module: nn.Module, x: Tensor) -> Tensor:
    """The module's normalisation of ``x`` without its weight and bias, in the module's own arithmetic.

    An RMSNorm is run with its weight set to one and to zero, the difference being
    its normalised input exactly, whether it multiplies by ``w`` (Llama, which
    normalises in float32 whatever the input's dtype) or by ``1 + w`` (Gemma).
    Called after the hooks are removed.
    """
    if kind == "layernorm":
        return nn.functional.layer_norm(x, tuple(module.normalized_shape), None, None, module.eps)
    weight = module.weight
    with torch.no_grad():
        ones = functional_call(module, {"weight": torch.ones_like(weight)}, (x.to(weight.dtype),))
        zeros = functional_call(module, {"weight": torch.zeros_like(weight)}, (x.to(weight.dtype),))
    return (ones - zeros).to(x.dtype)
