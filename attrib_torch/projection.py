"""dattri-style ``projector_kwargs`` turned into an :func:`attrib_core.projector`."""

from __future__ import annotations

from typing import Any, Dict, Optional

from attrib_core import Projector, projector

__all__ = ["projector_from_kwargs"]

_TYPES = {"rademacher": "rademacher", "gaussian": "gaussian", "normal": "gaussian", "sjlt": "sjlt",
          "mask": "mask", "identity": "identity"}
# Accepted for compatibility, with no effect: projections here are tiled and run where the data is.
_IGNORED = {"proj_max_batch_size", "device", "use_half_precision"}


def projector_from_kwargs(
    projector_kwargs: Optional[Dict[str, Any]], dim_in: int, *, default_dim: Optional[int] = None
) -> Optional[Projector]:
    """The projector that ``projector_kwargs`` asks for, or None (no projection).

    Keys: ``proj_dim`` (``>= 1``; required unless ``default_dim`` is given),
    ``proj_seed`` (default 0), ``proj_type`` (``rademacher``, the default; ``gaussian``
    or ``normal``; ``sjlt``; ``mask``; ``identity``), ``nnz`` (for ``sjlt``), and, with no
    effect, dattri's ``proj_max_batch_size``, ``device``, ``use_half_precision``.
    A ``proj_dim`` of at least ``dim_in`` with no ``proj_type`` keeps the gradients as they are.

    Raises:
        ValueError: unknown keys, ``proj_dim < 1``, an unknown ``proj_type``.
    """
    if projector_kwargs is None:
        if default_dim is None:
            return None
        projector_kwargs = {"proj_dim": default_dim}
    if not isinstance(projector_kwargs, dict):
        raise ValueError(f"projector_kwargs: expected a dict or None, got {type(projector_kwargs).__name__}")
    unknown = set(projector_kwargs) - {"proj_dim", "proj_seed", "proj_type", "nnz"} - _IGNORED
    if unknown:
        raise ValueError(
            f"projector_kwargs: unknown keys {sorted(unknown)}; expected proj_dim, proj_seed, proj_type, nnz "
            f"(and {sorted(_IGNORED)}, which have no effect)"
        )
    dim = projector_kwargs.get("proj_dim", default_dim)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"projector_kwargs: proj_dim must be an integer >= 1, got {dim!r}")
    kind = projector_kwargs.get("proj_type")
    if kind is not None and kind not in _TYPES:
        raise ValueError(f"projector_kwargs: proj_type must be one of {sorted(_TYPES)}, got {kind!r}")
    if kind is None and dim >= dim_in:
        return None
    return projector(dim_in, dim, kind=_TYPES[kind or "rademacher"], seed=projector_kwargs.get("proj_seed", 0),
                     nnz=projector_kwargs.get("nnz", 4))
