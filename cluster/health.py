"""A serving unit's health, as its shard supervisor sees it and as `/health` reports it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Health:
    """`status` is "ok", "recovering" (requests get 503 meanwhile), "unreachable" (no AttentionRouter replica
    answers: Serve is restarting it) or "failed"; `detail` says why. `stats` holds the engine's counters, the kernels
    it runs and the replica's pid."""

    status: str = "ok"
    detail: str = ""
    stats: dict[str, int | str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"
