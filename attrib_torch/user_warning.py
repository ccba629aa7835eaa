"""Warnings that point at the user's line: the first frame outside this library, however deep they are raised."""

from __future__ import annotations

import os
import sys
import warnings

__all__ = ["warn"]

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OURS = tuple(os.path.join(_ROOT, package) + os.sep for package in ("attrib_torch", "attrib_core", "kernels"))


def warn(message: str, category: type = UserWarning) -> None:
    """``warnings.warn(message)`` attributed to the innermost caller outside ``attrib_torch``/``attrib_core``/``kernels``."""
    frame = sys._getframe(1)
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_OURS):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
