"""Optional dependencies: imported where a call needs them, named by the extra that installs them.

``import evit_patch`` and the patches need only torch and timm; MAC counting with fvcore,
width pruning, plots, training and export each need more. Every such import goes through
:func:`require`, so a missing package is one ``ImportError`` that says what to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """``module`` imported, or an ``ImportError`` naming ``pip install "evit_patch[extra]"``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{module} is needed here and is not installed: pip install \"evit_patch[{extra}]\"") from error
