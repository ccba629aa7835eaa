"""kernels: Triton kernels for the GPU hot path, with a torch reference as the CPU path.

* :func:`project` — ``(B, P) -> (B, k)`` by a random matrix defined entry by entry
  by a counter-based hash (:mod:`kernels.hash`) and never materialised whole;
  ``rademacher``, ``gaussian`` or ``sjlt``.
* :func:`inner` — all inner products (or cosines, normalisation fused).
* :func:`topk_inner` — streaming top-k inner products, never holding ``(n, m)``;
  :func:`merge_topk` — its reduction, for scores computed elsewhere.
* :func:`backend` — which path (``"triton"`` or ``"torch"``) a call takes.

This package imports neither :mod:`attrib_core` nor :mod:`attrib_torch`, and works
without Triton installed.
"""

from .dispatch import KINDS, TopK, backend, empty_topk, inner, merge_topk, project, projection_entries, topk_inner

__all__ = ["project", "projection_entries", "inner", "topk_inner", "merge_topk", "empty_topk", "backend", "TopK",
           "KINDS"]
