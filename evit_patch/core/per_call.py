"""Values that belong to one forward of a model, not to the model.

Servers run one model from several threads at once, so what a forward computes (the token
maps behind ``kept_tokens``, token sizes, outside scores, attention key weights) may not
sit in a module attribute that the next call overwrites. A thread runs one forward of a
model at a time, so a value per thread is a value per call: each forward starts its own
(the pre-hook of the module that takes the images), and after it the calling thread reads
what its own last forward left. ``threading.local`` is used as torch.compile traces it
without a graph break (a ``ContextVar`` it cannot set). Pickles and copies start empty.
"""

from __future__ import annotations

import threading
from typing import Any


class PerCall:
    """Named values of the forward running in the calling thread; ``get`` gives ``default``
    for a name the thread's forwards have not set."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self._local, name, default)

    def set(self, name: str, value: Any) -> None:
        setattr(self._local, name, value)

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._local = threading.local()

    def __deepcopy__(self, memo: dict) -> "PerCall":
        return PerCall()
