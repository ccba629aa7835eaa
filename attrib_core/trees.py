"""Parameter trees: flattening to one vector and selecting by name.

Parameters are a ``dict[str, Tensor]`` keyed like ``model.named_parameters()``,
the form :func:`torch.func.functional_call` takes.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Union

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

Params = Mapping[str, Tensor]
Names = Union[str, Iterable[str], None]

__all__ = ["ravel", "select", "examples_in", "Params", "Names"]


def examples_in(batch: Any) -> int:
    """The batch size: the leading dimension of the batch's first tensor with one."""
    for leaf in pytree.tree_leaves(batch):
        if isinstance(leaf, Tensor) and leaf.dim():
            return leaf.shape[0]
    raise ValueError("batch: holds no tensor with a batch dimension")


def ravel(params: Params) -> tuple[Tensor, Callable[[Tensor], dict[str, Tensor]]]:
    """Flatten a parameter dict into one vector, the analogue of JAX's ``ravel_pytree``.

    Args:
        params: ``{name: tensor}``; the order of the dict is the order of the vector.

    Returns:
        ``(flat, unravel)``: ``flat`` of shape ``(P,)`` in the promoted dtype of the
        parameters, and ``unravel(v)`` which maps ``(..., P)`` back to
        ``{name: (..., *shape)}``, each entry cast back to its parameter's dtype.
        Leading dimensions are kept, so ``unravel`` also splits per-sample
        gradients ``(B, P)`` into ``{name: (B, *shape)}``.
    """
    _check_params(params)
    names = list(params)
    shapes = [tuple(params[n].shape) for n in names]
    dtypes = [params[n].dtype for n in names]
    sizes = [params[n].numel() for n in names]
    dtype = _promoted_dtype(dtypes)
    flat = torch.cat([params[n].reshape(-1).to(dtype) for n in names])
    total = flat.numel()

    def unravel(vector: Tensor) -> dict[str, Tensor]:
        if vector.shape[-1:] != (total,):
            raise ValueError(
                f"unravel: expected a tensor whose last dimension is P={total}, "
                f"got shape {tuple(vector.shape)}"
            )
        lead = vector.shape[:-1]
        pieces = torch.split(vector, sizes, dim=-1)
        return {
            n: piece.reshape((*lead, *shape)).to(dt)
            for n, piece, shape, dt in zip(names, pieces, shapes, dtypes)
        }

    return flat, unravel


def select(params: Params, names: Names) -> dict[str, Tensor]:
    """Keep the parameters named by ``names``.

    Args:
        params: ``{name: tensor}``.
        names: ``None`` (keep all), one name, or an iterable of names. A name is a
            parameter name (``"fc.weight"``) or a module prefix (``"fc"`` keeps
            ``"fc.weight"`` and ``"fc.bias"``; ``"encoder"`` keeps everything under
            ``encoder.``). A plain string is always one name.

    Returns:
        The selected ``{name: tensor}`` in the order of ``params``.

    Raises:
        ValueError: a name matches nothing; the message lists the valid names.
        TypeError: ``names`` is neither a string, an iterable of strings, nor None.
    """
    if names is None:
        return dict(params)
    wanted = _as_name_list(names)
    chosen: set[str] = set()
    unknown = []
    for name in wanted:
        matches = [p for p in params if p == name or p.startswith(name + ".")]
        if not matches:
            unknown.append(name)
        chosen.update(matches)
    if unknown:
        raise ValueError(
            f"names: {unknown} match no parameter. Valid names are the parameters "
            f"{list(params)} and the module prefixes {valid_prefixes(params)}"
        )
    return {p: t for p, t in params.items() if p in chosen}


def split_by_module(flat: Tensor, params: Params) -> dict[str, Tensor]:
    """Columns of per-example gradients ``(B, P)`` (laid out as :func:`ravel`) grouped by module, ``{module: (B, P_m)}``.

    A module's block holds its parameters' columns in ``params`` order (``"fc.weight"``
    then ``"fc.bias"`` for module ``"fc"``; a top-level parameter belongs to module
    ``""``): the layer blocks that DataInf and other layer-wise methods take.

    Raises:
        ValueError: ``flat`` does not have ``P = Σ numel`` columns.
    """
    _check_params(params)
    sizes = [t.numel() for t in params.values()]
    if flat.dim() != 2 or flat.shape[1] != sum(sizes):
        raise ValueError(f"flat: expected (B, {sum(sizes)}) gradients laid out like params, got {tuple(flat.shape)}")
    columns: dict[str, list[Tensor]] = {}
    for (name, _), part in zip(params.items(), flat.split(sizes, dim=1)):
        columns.setdefault(name.rpartition(".")[0], []).append(part)
    return {module: parts[0] if len(parts) == 1 else torch.cat(parts, dim=1) for module, parts in columns.items()}


def valid_prefixes(params: Params) -> list[str]:
    """Every module prefix of the parameter names (``"a.b.weight"`` gives ``"a"``, ``"a.b"``)."""
    seen: dict[str, None] = {}
    for name in params:
        parts = name.split(".")
        for i in range(1, len(parts)):
            seen[".".join(parts[:i])] = None
    return list(seen)


def _as_name_list(names: Names) -> list[str]:
    if isinstance(names, str):
        return [names]
    try:
        listed = list(names)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"names: expected a string, an iterable of strings or None, got {type(names).__name__}"
        ) from None
    bad = [n for n in listed if not isinstance(n, str)]
    if bad:
        raise TypeError(f"names: every entry must be a string, got {bad!r}")
    if not listed:
        raise ValueError("names: an empty list selects no parameter")
    return listed


def _check_params(params: Params) -> None:
    if not isinstance(params, Mapping):
        raise TypeError(
            f"params: expected a dict of name -> tensor, got {type(params).__name__}"
        )
    if not params:
        raise ValueError("params: the parameter dict is empty")
    bad = [n for n, t in params.items() if not isinstance(t, Tensor)]
    if bad:
        raise TypeError(f"params: entries {bad} are not tensors")


def _promoted_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    out = dtypes[0]
    for dt in dtypes[1:]:
        out = torch.promote_types(out, dt)
    return out
