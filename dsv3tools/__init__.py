"""dsv3tools: download, cut, re-quantize, reshard and verify the DeepSeek-V3 checkpoint.

``import dsv3tools`` stays light: :func:`load_model` (which imports torch) is resolved lazily.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_model"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from dsv3tools.model.api import load_model

        return load_model
    raise AttributeError(f"module 'dsv3tools' has no attribute {name!r}")
