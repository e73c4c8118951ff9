"""fedpt: federated proxy-tuning of large language models.

Importing fedpt changes nothing in the process: entry points call `fedpt.runtime.setup_process()` themselves,
and the library's names below load torch only when first used.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# name -> module: `fedpt.load(...)` and friends, imported on first use so that `import fedpt` stays light
_LAZY = {"load": "fedpt.llm", "LLM": "fedpt.llm", "ModelSpec": "fedpt.proxy.spec", "Sampling": "fedpt.decoding",
         "Fusion": "fedpt.proxy"}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'fedpt' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
