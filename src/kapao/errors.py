"""The one exception type users see: its message is a complete, one-line explanation."""

from __future__ import annotations

import importlib.util

TORCH_EXTRA = 'pip install "kapao[torch]"'


class KapaoError(Exception):
    """Bad input or configuration. The message names the file, what is wrong and what to do;
    the CLI prints it as one line and exits non-zero, without a traceback."""


def has_torch() -> bool:
    """Whether PyTorch is installed (checked without importing it)."""
    return importlib.util.find_spec("torch") is not None


def require_torch(what: str) -> None:
    """Raise the one missing-extra error when PyTorch is not installed, e.g.
    `require_torch("kapao train")` -> KapaoError('kapao train needs PyTorch: pip install "kapao[torch]"').

    Called at the entry points of the torch layer (CLI verbs that train, export or convert; loading
    `.pt`/`.safetensors` weights), before anything imports torch."""
    if not has_torch():
        raise KapaoError(f"{what} needs PyTorch: {TORCH_EXTRA}")
