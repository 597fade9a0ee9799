"""What a gRPC client's resources leave out, and why: shown once per change (the
assembly logs it) and bounded, whatever the mesh's size."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

MAX_NOTES: Final = 32  # distinct notes kept; the rest are counted


@dataclass(slots=True)
class LeftOut:
    """Notes such as ``"rate_limit: route default of reviews.default"``, in order, at most
    ``MAX_NOTES`` of them; ``more`` counts the notes past it (a repeat of a kept one
    is not counted; past the limit, repeats are)."""

    notes: list[str] = field(default_factory=list)
    more: int = 0

    def add(self, what: str, where: str) -> None:
        note = f"{what}: {where}"
        if note in self.notes:
            return
        if len(self.notes) < MAX_NOTES:
            self.notes.append(note)
        else:
            self.more += 1

    def extend(self, other: LeftOut) -> None:
        for note in other.notes:
            what, _, where = note.partition(": ")
            self.add(what, where)
        self.more += other.more

    def __bool__(self) -> bool:
        return bool(self.notes) or self.more > 0

    def summary(self) -> list[str]:
        return [*self.notes, *([f"... and {self.more} more"] if self.more else [])]
