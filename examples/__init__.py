"""Short scripts that build estimators from the public names of ``attrib_core`` and ``kernels``.

Run one from the repository root with ``python -m examples.<name>``.
"""
