"""Facts about the arrays of one trace, looked up by the arrays themselves."""

from __future__ import annotations

from typing import Any


class IdentityRecord:
    """Maps an array (by identity, not value) to a tuple of facts about it.

    Used at trace time by transforms that tell each other about arrays they produced
    (``adaptx._core.skip``, ``adaptx._core.hints``). The arrays are kept alive with
    their entries, so an ``id`` cannot be reused while it is recorded.
    """

    def __init__(self):
        self._entries: dict[int, tuple[Any, tuple]] = {}

    def put(self, key: Any, *facts: Any) -> None:
        self._entries[id(key)] = (key, facts)

    def get(self, key: Any) -> tuple | None:
        """The facts recorded for this very ``key``, or ``None``."""
        entry = self._entries.get(id(key))
        return entry[1] if entry is not None and entry[0] is key else None
