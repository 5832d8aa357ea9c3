"""Bodies of the compatible APIs (OpenAI, Anthropic) that refuse what this server does not do.

A field of the outside API that would change what is generated (tools, structured output, another
sampler knob) is a 400 naming it when set to anything but its off value, never answered as if it had
not been sent. Each body lists its own in `NOT_SERVED`; every other unknown field changes nothing and is
kept aside, unused (`extra="allow"`, so the check can see it).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from eztinker.engine.errors import InvalidInputError


class RefusesNotServed(BaseModel):
    model_config = ConfigDict(extra="allow")

    NOT_SERVED: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {}  # field -> (its off values, why)

    def refuse_not_served(self) -> None:
        """A 400 naming the first `NOT_SERVED` field the request sets to anything but its off value."""
        sent = self.model_extra or {}
        for name, (off, reason) in self.NOT_SERVED.items():
            if name in sent and sent[name] not in off:
                raise InvalidInputError(name, reason)
