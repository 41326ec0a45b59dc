"""This thread's state of hqqlora's model-level calls (see :mod:`hqqlora._route`).

``threading.local`` rather than ``contextvars``: dynamo traces attribute reads and
writes on it (so ``torch.compile(fullgraph=True)`` of a ``functional_call`` works),
while it cannot trace ``ContextVar.set``; every hqqlora call sets and restores the
state synchronously, so tasks sharing a thread never see each other's values.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

__all__ = ["STATE"]


class _State(threading.local):
    def __init__(self) -> None:
        # functional_call: layer (or named shim) -> adapter dict, or None outside one.
        self.adapters: Mapping[nn.Module, Any] | None = None
        # model(..., adapter_names=...): the names, or None.
        self.adapter_names: Sequence[str] | None = None
        # (root module, the names before its call) for each model call under way.
        self.names_stack: list[tuple[nn.Module, Sequence[str] | None]] = []
        # The prepared layer whose own forward is running (hooks already ran), and the
        # one whose next call must run its original forward (base_forward's call).
        self.running: nn.Module | None = None
        self.bypass: nn.Module | None = None


STATE = _State()
