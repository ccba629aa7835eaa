"""Capture the inputs and output gradients of tracked layers, as a pure function of (params, batch).

Tracked layers: ``nn.Linear``, ``nn.Conv2d`` (through unfold), Hugging Face's
``Conv1D`` (GPT-2's linear layers, weight stored ``(d_in, d_out)``) and
``nn.Embedding`` (its input factor the one-hot rows of the token ids).

Kronecker-factored curvature needs, for each layer, its input activations ``a``
and the gradients ``ds`` of each example's loss with respect to the layer's
output ``s = W a (+ b)``. :func:`capture` runs the user's loss once with
temporary forward hooks on the named modules (removed before it returns), adds
a zero "probe" tensor to each layer's output and differentiates the loss with
respect to the probes. Nothing is registered globally and the model is left
as it was.

:func:`capture` scales the batch's gradients by a reduction (mean or sum), which
is right only for losses that are plain means or sums of per-example terms.
:func:`capture_per_example` presents each example to the loss as a batch of one
(``vmap`` over the probes, one batched pass), which is exact whatever the loss
normalises by (class weights, a masked token mean), and proves that the loss
reaches the factored weights only through their layers: an exact per-example
gradient ``Σ_t ds_t ⊗ a_t``, or an error.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._checks import all_finite, check_finite_params, check_reduction
from .gradients import _add_dim, _expand_in_dims, _take
from .trees import examples_in

__all__ = ["LayerSpec", "Captured", "Coverage", "layer_specs", "layer_kind", "coverage", "untracked_reason",
           "capture", "capture_per_example", "capture_examples", "layer_factors", "layer_input", "probed_pass",
           "DirectParameterUse", "MAX_EMBEDDING_ROWS", "InputMaps"]

_SUPPORTED = {nn.Linear: "linear", nn.Conv2d: "conv2d", nn.Embedding: "embedding"}
# Hugging Face's Conv1D, recognised by where it is defined so that transformers is never imported here.
_HF_CONV1D = ("transformers.pytorch_utils", "Conv1D")
# An Embedding's input factor is one-hot over its rows: beyond this many rows, hold its gradients otherwise
# (or give the capture an input map that compresses the rows from their ids, as LoGra does).
MAX_EMBEDDING_ROWS = 8192
# ``input_maps[module](ids, dtype) -> (..., k)``: an Embedding's input factor computed from its ids, in place of
# the one-hot rows (their compression, never forming the one-hot).
InputMaps = Optional[Mapping[str, Callable[[Tensor, torch.dtype], Tensor]]]


def layer_kind(module: nn.Module) -> Optional[str]:
    """``"linear"``, ``"conv2d"``, ``"conv1d"`` (Hugging Face's) or ``"embedding"``; None for a module not tracked."""
    kind = _SUPPORTED.get(type(module))
    if kind is None and (type(module).__module__, type(module).__name__) == _HF_CONV1D:
        kind = "conv1d"
    return kind


_SUPPORTED_NAMES = "nn.Linear, nn.Conv2d, nn.Embedding and transformers' Conv1D"
_TRANSPOSED = ("conv1d", "embedding")  # kinds whose weight is stored (d_in, d_out)


class LayerSpec(NamedTuple):
    """A factored layer: its module path, kind, parameter names and factor sizes.

    ``d_in`` counts the weight's input side (``in_features``, ``C_in · kh · kw``
    for a convolution, the rows of an embedding) without the bias; the activation
    factor has ``d_in + 1`` rows when ``bias`` is not None (the bias is the weight
    of an appended constant 1, laid out as the last column of ``[W | b]``). The
    gradient ``Σ_t ds_t a_tᵀ`` is ``(d_out, d_a)`` whatever the layout of the weight:
    :meth:`as_matrix` and :meth:`as_weight` translate (a Conv1D's and an
    Embedding's weight is stored ``(d_in, d_out)``).
    """

    module: str
    kind: str
    weight: str
    bias: Optional[str]
    d_in: int
    d_out: int

    @property
    def d_a(self) -> int:
        return self.d_in + (self.bias is not None)

    @property
    def transposed(self) -> bool:
        """The weight is stored ``(d_in, d_out)`` (Conv1D, Embedding), not ``(d_out, d_in)``."""
        return self.kind in _TRANSPOSED

    def as_matrix(self, flat: Tensor) -> Tensor:
        """Flattened weights ``(n, numel)`` in the parameter's own layout as ``(n, d_out, d_in)``."""
        if self.transposed:
            return flat.reshape(flat.shape[0], self.d_in, self.d_out).transpose(1, 2)
        return flat.reshape(flat.shape[0], self.d_out, self.d_in)

    def as_weight(self, M: Tensor) -> Tensor:
        """``(n, d_out, d_in)`` as flattened weights ``(n, numel)`` in the parameter's own layout."""
        if self.transposed:
            M = M.transpose(1, 2)
        return M.reshape(M.shape[0], -1)

    def gradient_matrix(self, G: Tensor) -> Tensor:
        """The layer's flattened gradients ``(n, numel [+ d_out])`` (weight, then bias if factored) as ``(n, d_out, d_a)``."""
        M = self.as_matrix(G[:, : self.d_out * self.d_in])
        if self.bias is None:
            return M
        return torch.cat([M, G[:, self.d_out * self.d_in :].reshape(G.shape[0], self.d_out, 1)], dim=2)

    def flat_gradient(self, M: Tensor) -> Tensor:
        """``(n, d_out, d_a)`` as the layer's flattened gradients, the inverse of :meth:`gradient_matrix`."""
        flat = self.as_weight(M[:, :, : self.d_in])
        return flat if self.bias is None else torch.cat([flat, M[:, :, self.d_in]], dim=1)


class Captured(NamedTuple):
    """One layer's rows for one batch: ``a`` ``(B, T, d_a)``, ``ds`` ``(B, T, d_out)``, and the valid positions."""

    a: Tensor
    ds: Tensor
    positions: int


def layer_specs(
    model: nn.Module, params: Mapping[str, Tensor], layers: Union[None, str, Sequence[str]], *, tied: bool = False,
    one_hot: bool = True,
) -> tuple[LayerSpec, ...]:
    """The factored layers: every tracked layer whose weight is in ``params`` (``layers=None``) or the named ones.

    Tracked: ``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding`` and transformers' ``Conv1D``.
    A bias is factored with its layer when it is in ``params``. With ``layers=None``,
    layers that cannot be factored exactly (:func:`untracked_reason` says why: a weight
    tied to another layer's, an embedding of more than :data:`MAX_EMBEDDING_ROWS` rows,
    ...) are left out; the caller reports what is left out (:func:`coverage`).
    With ``tied=True`` a weight shared by several layers (tied input and output
    embeddings) is kept: each of its layers gets a spec whose ``weight`` is the
    shared parameter's name in ``params``, for callers that add the layers' parts
    (:func:`attrib_core.compression` does). With ``one_hot=False`` embeddings of any
    number of rows are kept, for callers that capture them through ``input_maps``.

    Raises:
        ValueError: a name is not a module of ``model``, its weight is not in
            ``params``, it is of a type that cannot be factored or cannot be factored
            exactly (named in the message), or nothing is left to factor.
    """
    modules = dict(model.named_modules())
    weights = _weight_names(model) if tied else {}
    weight_of = (lambda n: weights.get(n, f"{_prefix(n)}weight"))
    if layers is None:
        candidates = [n for n, m in modules.items() if layer_kind(m) is not None and weight_of(n) in params]
        reasons = {n: untracked_reason(model, n, tied=tied, one_hot=one_hot) for n in candidates}
        names = [n for n in candidates if reasons[n] is None]
        if not names:
            why = "; ".join(f"{n!r}: {r}" for n, r in reasons.items())
            raise ValueError(f"layers: the model has no {_SUPPORTED_NAMES} layer whose weight is in params"
                             + (f" and that can be factored exactly ({why})" if why else ""))
    else:
        names = [layers] if isinstance(layers, str) else list(layers)
        unknown = [n for n in names if n not in modules]
        if unknown:
            valid = [n for n, m in modules.items() if layer_kind(m) is not None]
            raise ValueError(f"layers: {unknown} are not modules of the model; factorable layers: {valid}")
        for n in names:
            if layer_kind(modules[n]) is None:
                raise ValueError(
                    f"layers: {n!r} is a {type(modules[n]).__name__}, which cannot be Kronecker-factored; "
                    f"supported: {_SUPPORTED_NAMES}"
                )
            if weight_of(n) not in params:
                raise ValueError(f"layers: the weight {weight_of(n)} of {n!r} is not in params")
            reason = untracked_reason(model, n, tied=tied, one_hot=one_hot)
            if reason is not None:
                raise ValueError(f"layers: {n!r} cannot be factored exactly: {reason}")
    return tuple(_spec(n, modules[n], params, weight_of(n)) for n in names)


def _weight_names(model: nn.Module) -> dict[str, str]:
    """Each module's weight as ``model.named_parameters()`` names it (a tied weight under its first name)."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    return {path: canonical[id(m.weight)] for path, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), nn.Parameter) and id(m.weight) in canonical}


class Coverage(NamedTuple):
    """Which of the parameters the factored layers cover, and what is left out and why.

    Attributes:
        covered: parameter names the layers' factors hold (weights and factored biases).
        left_out: the other parameter names, in ``params`` order.
        share: the fraction of all parameter entries that ``left_out`` holds.
        reasons: for each left-out layer of a tracked kind, why it was not factored.
    """

    covered: tuple[str, ...]
    left_out: tuple[str, ...]
    share: float
    reasons: dict[str, str]

    def describe(self, limit: int = 8) -> str:
        """One line: what is left out, its share, and why (for the first ``limit`` names)."""
        names = ", ".join(self.left_out[:limit]) + (f" and {len(self.left_out) - limit} more"
                                                     if len(self.left_out) > limit else "")
        why = "".join(f"; {m!r} {r}" for m, r in list(self.reasons.items())[:limit])
        return (f"{len(self.left_out)} parameters ({100 * self.share:.1f}% of all entries) are in no factored "
                f"layer: {names}{why}")


def coverage(model: nn.Module, params: Mapping[str, Tensor], specs: Sequence[LayerSpec]) -> Coverage:
    """What ``specs`` cover of ``params``: the parameters left out (norms' weights, untracked layers) and their share."""
    covered = {s.weight for s in specs} | {s.bias for s in specs if s.bias is not None}
    left_out = tuple(n for n in params if n not in covered)
    total = sum(v.numel() for v in params.values())
    share = sum(params[n].numel() for n in left_out) / max(total, 1)
    tracked = {s.module for s in specs}
    reasons = {}
    for name, module in model.named_modules():
        if name in tracked or layer_kind(module) is None or f"{_prefix(name)}weight" not in params:
            continue
        reasons[name] = untracked_reason(model, name) or "was not named in layers"
    return Coverage(tuple(n for n in params if n in covered), left_out, share, reasons)


def untracked_reason(model: nn.Module, name: str, *, tied: bool = False, one_hot: bool = True) -> Optional[str]:
    """Why the tracked-kind layer ``name`` cannot be factored exactly, or None when it can (``tied``: a weight
    shared with other layers is no reason; ``one_hot=False``: an embedding's number of rows is none)."""
    modules = dict(model.named_modules())
    module = modules[name]
    kind = layer_kind(module)
    sharing = [n for n, m in modules.items() if n != name and layer_kind(m) is not None
               and getattr(m, "weight", None) is module.weight]
    if sharing and not tied:
        return (f"its weight is tied to that of {sharing} (tied weights' gradients add over several layers, "
                "which no single layer's factors hold)")
    if kind == "conv2d":
        if module.groups != 1:
            return f"it is a grouped convolution (groups={module.groups})"
        if module.padding_mode != "zeros":
            return f"it pads with {module.padding_mode!r}; only 'zeros' is supported"
        try:
            _conv_padding(name, module)
        except ValueError:
            return "it uses asymmetric 'same' padding"
    if kind == "embedding":
        if one_hot and module.num_embeddings > MAX_EMBEDDING_ROWS:
            return (f"it has {module.num_embeddings:,} rows, more than the {MAX_EMBEDDING_ROWS:,} its one-hot "
                    "input factor is built for")
        if module.max_norm is not None:
            return "it renormalises its rows in place (max_norm)"
        if module.scale_grad_by_freq:
            return "it scales gradients by the batch's token counts (scale_grad_by_freq)"
    return None


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _spec(name: str, module: nn.Module, params: Mapping[str, Tensor], weight: str) -> LayerSpec:
    kind = layer_kind(module)
    has_bias = getattr(module, "bias", None) is not None
    bias = f"{_prefix(name)}bias" if has_bias and f"{_prefix(name)}bias" in params else None
    shape = params[weight].shape
    if kind in _TRANSPOSED:
        return LayerSpec(name, kind, weight, bias, int(shape[0]), int(shape[1]))
    return LayerSpec(name, kind, weight, bias, int(shape[1:].numel()), int(shape[0]))


def _conv_padding(name: str, module: nn.Conv2d) -> tuple[int, int]:
    if module.padding == "valid":
        return (0, 0)
    if module.padding == "same":
        pads = []
        for k, d, s in zip(module.kernel_size, module.dilation, module.stride):
            total = d * (k - 1)
            if total % 2 or s != 1:
                raise ValueError(f"layers: {name!r} uses asymmetric 'same' padding; not supported")
            pads.append(total // 2)
        return tuple(pads)
    return tuple(module.padding)


def capture(
    model: nn.Module,
    f: Callable[[Mapping[str, Tensor], Any], Tensor],
    params: Mapping[str, Tensor],
    batch: Any,
    specs: Sequence[LayerSpec],
    *,
    reduction: str = "mean",
    mask: Optional[Tensor] = None,
    verify_broadcast: bool = True,
    input_maps: InputMaps = None,
) -> dict[str, Captured]:
    """Per-layer activations and per-example output gradients for one batch.

    Args:
        model: the module whose submodules ``specs`` name; ``f`` must run it (with
            ``torch.func.functional_call(model, params, ...)``).
        f: the batched loss ``f(params, batch) -> scalar``.
        params: the point of evaluation.
        batch: passed to ``f``.
        specs: from :func:`layer_specs`.
        reduction: how ``f`` combines examples, ``"mean"`` or ``"sum"``; with
            ``"mean"`` the captured gradients are multiplied by the batch size (the
            leading dimension of the batch's first tensor) so that each is the
            gradient of its own example's loss. A layer whose input has ``B·T`` rows
            (tokens flattened into the batch, example-major) is regrouped to
            ``(B, T, d)``.
        mask: ``(B, T)``, nonzero at valid positions of sequence inputs; applied
            to Linear, Conv1D and Embedding layers with several positions per example (inputs ``(B, T, d)``,
            or ``(B·T, d)`` flattened).
        verify_broadcast: when a layer's single output row is shared by the batch
            (GPT-2's position embedding) and each example gets its own probe, run ``f``
            once more to check the loss is unchanged (a caller that checks the
            gradients otherwise, e.g. against autograd on the first batch, may skip it
            on later batches).
        input_maps: ``{embedding module: map(ids, dtype) -> (..., k)}``: that layer's
            input factor is ``map`` of its ids (zero at its ``padding_idx``) instead of
            its one-hot rows, e.g. their compression (:func:`attrib_core.embedding_input_maps`).

    Returns:
        ``{module: Captured(a, ds, positions)}`` with ``a`` of shape ``(B, T, d_a)``
        (a trailing 1 when the bias is factored) and ``ds`` of shape
        ``(B, T, d_out)``; ``T`` is 1 for 2-D inputs and the number of output
        positions for a convolution. Masked positions are zero in both and not
        counted in ``positions``.
    """
    check_reduction(reduction)
    check_finite_params(params)
    modules = dict(model.named_modules())
    examples = examples_in(batch)
    _, inputs, grads = probed_pass(model, f, params, batch, [s.module for s in specs],
                                   verify_broadcast=verify_broadcast)
    out = {}
    for spec, grad in zip(specs, grads):
        if reduction == "mean":
            grad = grad * examples
        out[spec.module] = layer_factors(spec, modules[spec.module], inputs[spec.module], grad, examples, mask=mask,
                                         input_maps=input_maps)
    return out


def layer_factors(spec: LayerSpec, module: nn.Module, x: Tensor, grad: Tensor, examples: int, *,
                  mask: Optional[Tensor] = None, input_maps: InputMaps = None, check_finite: bool = True) -> Captured:
    """One layer's per-example factors from its input ``x`` and the gradient ``grad`` of a loss with respect to
    its output, both with ``examples`` rows (or ``examples · T`` rows, tokens flattened example-major).

    ``Captured(a, ds, positions)`` as :func:`capture` returns (``mask`` and ``input_maps``
    as there): ``Σ_t ds_t a_tᵀ`` of an example is its share of that loss's gradient of
    the weight (and bias, as ``a``'s trailing 1). :func:`capture` reads ``x`` and ``grad``
    through probes; a training loop's own forward and backward pass can hand them over
    (:class:`attrib_torch.GradientRecorder`). ``check_finite=False`` skips the check that
    ``a`` and ``ds`` are finite, for a caller that checks what it makes of them.
    """
    a, ds = _positions(spec, module, x, grad, _input_map(input_maps, spec))
    a, ds = _per_example(spec, examples, a, ds)
    if spec.bias is not None:
        a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
    return _finished(spec, a, ds, mask, check_finite=check_finite)


def probed_pass(
    model: nn.Module,
    f: Callable[[Mapping[str, Tensor], Any], Tensor],
    params: Mapping[str, Tensor],
    batch: Any,
    paths: Sequence[str],
    *,
    verify_broadcast: bool = True,
) -> tuple[Tensor, dict[str, Tensor], list[Tensor]]:
    """One forward pass of ``f`` with a zero probe added to each module's output, and one backward pass of its sum.

    Returns ``(value, inputs, output_grads)``: ``f``'s value (a scalar or one per
    example), each module's input (detached), and the gradient of
    ``value.sum()`` with respect to each probe in ``paths`` order (zeros where the
    module does not reach ``f``). The hooks are prepended (the probe sits on the
    module's own output, before any hook of the user's) and removed before returning.

    A module whose one output row is shared by the batch (GPT-2's position embedding
    of ``(1, T)`` ids) gets a probe per example, so that each keeps its own output
    gradient; its input is expanded to match. With ``verify_broadcast``, ``f`` then runs
    once more to check the widened outputs leave its value unchanged.

    Raises:
        ValueError: a module runs more than once (shared weights) or not at all, or a
            widened output changes ``f``'s value.
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    examples = examples_in(batch)
    inputs: dict[str, Tensor] = {}
    probes: dict[str, Tensor] = {}
    broadcast: list[str] = []

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
            if name in probes:
                raise ValueError(f"layers: {name!r} runs more than once in a forward pass (shared weights)")
            x = layer_input(name, args, kwargs).detach()
            shape = tuple(output.shape)
            if output.dim() > 1 and shape[0] == 1 and examples > 1:  # one row shared by the batch
                broadcast.append(name)
                x = x.expand(examples, *x.shape[1:])
                shape = (examples, *shape[1:])
            probes[name] = torch.zeros(shape, dtype=output.dtype, device=output.device, requires_grad=True)
            inputs[name] = x
            return output + probes[name]

        return hook

    handles = [modules[p].register_forward_hook(hook_for(p), prepend=True, with_kwargs=True) for p in paths]
    detached = {k: v.detach() for k, v in params.items()}
    try:
        with torch.enable_grad():
            value = f(detached, batch)
            missing = [p for p in paths if p not in probes]
            if missing:
                raise ValueError(f"layers: {missing[:8]} did not run in the forward pass of f")
            grads = torch.autograd.grad(value.sum(), [probes[p] for p in paths], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    if broadcast and verify_broadcast:  # the widened outputs must leave the value as it was
        with torch.no_grad():
            plain = f(detached, batch)
        if not torch.allclose(value.detach(), plain, rtol=1e-6, atol=0.0):
            raise ValueError(f"layers: {broadcast} produce one output row shared by the batch, and giving each "
                             "example its own changes the loss; leave them out")
    grads = [torch.zeros_like(probes[p]) if g is None else g for p, g in zip(paths, grads)]
    return value.detach(), inputs, grads


def _finished(spec: LayerSpec, a: Tensor, ds: Tensor, mask: Optional[Tensor], *, check_finite: bool = True) -> Captured:
    """One layer's rows, masked at padded sequence positions and checked to be finite."""
    positions = a.shape[0] * a.shape[1]
    if mask is not None and spec.kind != "conv2d" and a.shape[1] > 1:  # sequence positions
        a, ds = _apply_mask(spec, mask, a, ds)
        positions = int((mask != 0).sum())
    for value, what in ((a, "inputs"), (ds, "output gradients")) if check_finite else ():
        if not all_finite(value):
            raise ValueError(f"captured {what} of layer {spec.module!r} contain NaN or Inf")
    return Captured(a, ds, positions)


class DirectParameterUse(ValueError):
    """The loss reads a factored layer's weight or bias outside that layer (an L2 penalty, tied weights)."""


class _DirectUseMode(TorchFunctionMode):
    """Records every torch call that reads a tracked parameter while its own module is not running."""

    def __init__(self, owners: Mapping[int, tuple[str, str]]):
        super().__init__()
        self.owners = owners  # id(tensor) -> (module, parameter name)
        self.running: list[str] = []
        self.uses: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._note(func, args)
        if kwargs:
            self._note(func, kwargs.values())
        return func(*args, **kwargs)

    def _note(self, func, values) -> None:
        # Called on every torch operation of the forward pass: plain loops, no pytree.
        for value in values:
            if type(value) in (list, tuple):
                self._note(func, value)
                continue
            owner = self.owners.get(id(value))
            if owner is not None and owner[0] not in self.running and isinstance(value, Tensor):
                self.uses.append((owner[1], getattr(func, "__name__", str(func))))


def capture_per_example(
    model: nn.Module,
    f: Callable[[Mapping[str, Tensor], Any], Tensor],
    params: Mapping[str, Tensor],
    batch: Any,
    specs: Sequence[LayerSpec],
    *,
    mask: Optional[Tensor] = None,
    ignore_direct_use: bool = False,
    input_maps: InputMaps = None,
) -> dict[str, Captured]:
    """Per-layer inputs and output gradients of every example's own loss, in one vectorised pass.

    Row ``i`` holds the factors of ``∇ f(params, example_i)``, example ``i`` presented
    to ``f`` as a batch of one (the data convention of :func:`per_sample_grad`):
    ``torch.func.vmap`` maps over the examples and differentiates each example's
    loss with respect to zero probes added to the layers' outputs, so whatever ``f``
    normalises by (a mean, class weights, a masked token mean) its gradient is
    exactly ``Σ_t ds_t ⊗ a_t`` per layer. Tensors of the batch with a leading
    dimension are mapped over; other fields (strings, 0-d tensors) are passed as they are.

    Args:
        model, f, params, specs, mask, input_maps: as in :func:`capture`.
        batch: a tuple, list or dict of tensors whose first dimension indexes examples.
        ignore_direct_use: keep the factors even when ``f`` reads a factored weight
            outside its layer; they then carry only the part of the gradient that flows
            through the layer (what K-FAC approximates the Fisher of).

    Returns:
        ``{module: Captured(a (B, T, d_a), ds (B, T, d_out), positions)}`` as
        :func:`capture` returns, ``T`` the positions per example (its rows times its
        tokens or output pixels).

    Raises:
        DirectParameterUse: ``f`` reads a factored weight or bias other than through
            its layer (an L2 penalty, a tied embedding), so the factors would miss
            part of the gradient.
        ValueError: a layer ran more than once (shared weights) or not at all, or
            non-finite factors.
        RuntimeError: whatever ``vmap`` raises on a model it cannot trace.
    """
    check_finite_params(params)
    modules = dict(model.named_modules())
    detached = {k: v.detach() for k, v in params.items()}
    (dims,) = _expand_in_dims((batch,), (0,))  # batched tensors are mapped over; other fields are shared
    examples = examples_in(batch)
    outputs = _output_shapes(modules, f, detached, _take(batch, dims, 0), specs)
    owners = {id(detached[name]): (s.module, name) for s in specs for name in (s.weight, s.bias) if name}
    mode = _DirectUseMode(owners)

    def one(probes: dict, example: Any):
        inputs: dict[str, Tensor] = {}

        def enter(name: str):
            return lambda module, args: mode.running.append(name)

        def leave(name: str):
            def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
                mode.running.remove(name)
                if name in inputs:
                    raise ValueError(f"layers: {name!r} runs more than once in a forward pass (shared weights)")
                inputs[name] = layer_input(name, args, kwargs)
                return output + probes[name]

            return hook

        handles = []
        for s in specs:
            # The layer counts as running after the user's pre-hooks and until before the user's forward
            # hooks: a hook that reads the weight is a use outside the layer, and the probe sits on the
            # layer's own output.
            handles.append(modules[s.module].register_forward_pre_hook(enter(s.module)))
            handles.append(modules[s.module].register_forward_hook(leave(s.module), prepend=True,
                                                                   with_kwargs=True))
        try:
            loss = f(detached, _add_dim(example, dims))
        finally:
            for handle in handles:
                handle.remove()
        missing = [s.module for s in specs if s.module not in inputs]
        if missing:
            raise ValueError(f"layers: {missing} did not run in the forward pass of f")
        return loss, inputs

    probes = {name: torch.zeros(examples, *shape, dtype=dtype, device=device)
              for name, (shape, dtype, device) in outputs.items()}
    with mode, torch.enable_grad():
        grads, inputs = torch.func.vmap(torch.func.grad(one, has_aux=True), in_dims=(0, dims))(probes, batch)
    if mode.uses and not ignore_direct_use:
        name, op = mode.uses[0]
        raise DirectParameterUse(
            f"f reads the factored parameter {name!r} outside its layer (in {op}); its gradient has a part "
            "that the layer's inputs and output gradients do not carry"
        )
    out = {}
    for spec in specs:
        x, grad = inputs[spec.module], grads[spec.module]
        rows = x.shape[0] * x.shape[1]  # each example's rows, as a batch of one
        a, ds = _positions(spec, modules[spec.module], x.reshape(rows, *x.shape[2:]),
                           grad.reshape(rows, *grad.shape[2:]), _input_map(input_maps, spec))
        a, ds = a.reshape(examples, -1, a.shape[-1]), ds.reshape(examples, -1, ds.shape[-1])
        if spec.bias is not None:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        out[spec.module] = _finished(spec, a, ds, mask)
    return out


def capture_examples(
    model: nn.Module,
    f: Callable[[Mapping[str, Tensor], Any], Tensor],
    params: Mapping[str, Tensor],
    batch: Any,
    specs: Sequence[LayerSpec],
    *,
    mask: Optional[Tensor] = None,
    reduction: Optional[str] = None,
    verify_broadcast: bool = True,
    input_maps: InputMaps = None,
) -> dict[str, Captured]:
    """Each example's own factors, by the fastest exact route ``f`` allows (``verify_broadcast`` and
    ``input_maps`` as in :func:`capture`).

    - ``f.per_example(params, batch) -> (B,)`` exists (:class:`attrib_torch.CausalLMLoss`):
      one batched pass over their sum (:func:`capture` with ``reduction="sum"``);
    - else :func:`capture_per_example` (``vmap``; a weight read outside its layer is
      left out, as K-FAC approximates the Fisher of the part through the layers);
    - where ``vmap`` cannot trace ``f`` and ``reduction`` is given, the batch's output
      gradients scaled by it (exact for a plain mean or sum of per-example losses only);
      without ``reduction`` the error is raised.
    """
    per_example = getattr(f, "per_example", None)
    if callable(per_example):
        return capture(model, lambda p, b: per_example(p, b).sum(), params, batch, specs, reduction="sum",
                       mask=mask, verify_broadcast=verify_broadcast, input_maps=input_maps)
    try:
        return capture_per_example(model, f, params, batch, specs, mask=mask, ignore_direct_use=True,
                                   input_maps=input_maps)
    except (RuntimeError, ValueError) as error:  # vmap cannot trace f (batch statistics, data-dependent flow)
        if reduction is None:
            raise ValueError(f"f: vmap cannot trace it ({str(error).splitlines()[0][:160]}) and it has no "
                             "per_example(params, batch) method giving one loss per example; wrap a Hugging "
                             "Face model's loss in attrib_torch.CausalLMLoss") from error
        return capture(model, f, params, batch, specs, reduction=reduction, mask=mask,
                       verify_broadcast=verify_broadcast, input_maps=input_maps)


def layer_input(name: str, args: tuple, kwargs: dict) -> Tensor:
    """The input a layer was called with, positionally or as ``input=``."""
    if args:
        return args[0]
    if isinstance(kwargs.get("input"), Tensor):
        return kwargs["input"]
    raise ValueError(f"layers: {name!r} was called without an input tensor (positional or input=)")


def _output_shapes(modules: dict, f: Callable, params: Mapping[str, Tensor], example: Any,
                   specs: Sequence[LayerSpec]) -> dict[str, tuple]:
    """Each layer's output ``(shape, dtype, device)`` on ``example`` (a batch of one): the probes' layout."""
    found: dict[str, tuple] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            found.setdefault(name, (tuple(output.shape), output.dtype, output.device))

        return hook

    handles = [modules[s.module].register_forward_hook(hook_for(s.module)) for s in specs]
    try:
        with torch.no_grad():
            f(params, example)
    finally:
        for handle in handles:
            handle.remove()
    missing = [s.module for s in specs if s.module not in found]
    if missing:
        raise ValueError(f"layers: {missing} did not run in the forward pass of f")
    return found


def _input_map(input_maps: InputMaps, spec: LayerSpec) -> Optional[Callable[[Tensor, torch.dtype], Tensor]]:
    if not input_maps or spec.module not in input_maps:
        return None
    if spec.kind != "embedding":
        raise ValueError(f"input_maps: {spec.module!r} is a {spec.kind} layer; only embeddings' inputs are mapped")
    return input_maps[spec.module]


def _positions(spec: LayerSpec, module: nn.Module, x: Tensor, grad: Tensor,
               input_map: Optional[Callable[[Tensor, torch.dtype], Tensor]] = None) -> tuple[Tensor, Tensor]:
    """Inputs and output gradients as ``(B, T, d)`` rows, one per position the weight is applied at (an
    embedding's input through ``input_map`` of its ids where one is given)."""
    if spec.kind in ("linear", "conv1d"):
        if x.dim() == 1:
            raise ValueError(f"layer {spec.module!r}: input has no batch dimension, shape {tuple(x.shape)}")
        return x.reshape(x.shape[0], -1, x.shape[-1]), grad.reshape(grad.shape[0], -1, grad.shape[-1])
    if spec.kind == "embedding":
        # The input factor is the one-hot row of each id; the padding row gets no gradient in torch.
        ids = x.reshape(x.shape[0], -1).long()
        if input_map is None:
            a = nn.functional.one_hot(ids, spec.d_in).to(grad.dtype)
            if module.padding_idx is not None:
                a[..., module.padding_idx] = 0
        else:
            a = input_map(ids, grad.dtype)
            if module.padding_idx is not None:
                a = a * (ids != module.padding_idx).unsqueeze(-1).to(a.dtype)
        return a, grad.reshape(grad.shape[0], -1, grad.shape[-1])
    if x.dim() != 4:
        raise ValueError(f"layer {spec.module!r}: expected a (B, C, H, W) input, got shape {tuple(x.shape)}")
    patches = nn.functional.unfold(
        x,
        kernel_size=module.kernel_size,
        dilation=module.dilation,
        padding=_conv_padding(spec.module, module),
        stride=module.stride,
    )
    return rearrange(patches, "b d l -> b l d"), rearrange(grad, "b c h w -> b (h w) c")


def _per_example(spec: LayerSpec, examples: int, a: Tensor, ds: Tensor) -> tuple[Tensor, Tensor]:
    """Group rows by example: ``(B·T, L, d)`` (tokens flattened into the batch) becomes ``(B, T·L, d)``."""
    rows = a.shape[0]
    if rows == examples:
        return a, ds
    if rows % examples:
        raise ValueError(
            f"layer {spec.module!r}: its input has {rows} rows, not a multiple of the batch's {examples} examples"
        )
    return a.reshape(examples, -1, a.shape[-1]), ds.reshape(examples, -1, ds.shape[-1])


def _apply_mask(spec: LayerSpec, mask: Tensor, a: Tensor, ds: Tensor) -> tuple[Tensor, Tensor]:
    if tuple(mask.shape) != tuple(a.shape[:2]):
        raise ValueError(
            f"mask: shape {tuple(mask.shape)} does not match the (B, T) = {tuple(a.shape[:2])} "
            f"positions of layer {spec.module!r}"
        )
    keep = (mask != 0).to(a.dtype).unsqueeze(-1)
    return a * keep, ds * keep.to(ds.dtype)
