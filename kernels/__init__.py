"""kernels: Triton kernels for the GPU hot path, with a torch reference as the CPU path.

Random projection and batched inner products with streaming top-k (see
``DESIGN.md``). The kernels land with their issue; this package imports
neither :mod:`attrib_core` nor :mod:`attrib_torch`.
"""
