"""metav1.Condition as every status we write carries it (routes, Gateways, policies):
the object's ``observedGeneration``, a message the API server will take, and a
``lastTransitionTime`` kept while the condition's status holds, so a rewrite of an
unchanged condition is no transition."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

# metav1.Condition's bound on a message; a longer one makes the API server refuse the write.
MAX_MESSAGE: Final = 32768
_CUT: Final = " ... (cut; the server's log has every problem)"


def bounded(message: str) -> str:
    if len(message) <= MAX_MESSAGE:
        return message
    return message[:MAX_MESSAGE - len(_CUT)] + _CUT


def find_condition(conditions: Any, type_: str) -> dict[str, Any]:
    """The condition of type ``type_`` in a written ``conditions`` list (a copy), or {};
    anything malformed is as if absent."""
    for item in conditions if isinstance(conditions, list) else []:
        if isinstance(item, Mapping) and item.get("type") == type_:
            return dict(item)
    return {}


def condition_json(type_: str, status: str, reason: str, message: str, generation: int,
                   previous: Mapping[str, Any]) -> dict[str, Any]:
    """One condition; ``previous`` is the one of the same type written before ({} if
    none): its lastTransitionTime is kept while the status is the same."""
    since = previous.get("lastTransitionTime") if previous.get("status") == status else None
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": bounded(message),
        "observedGeneration": generation,
        "lastTransitionTime": since or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
