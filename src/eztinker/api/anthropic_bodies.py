"""The request bodies of the Anthropic Messages routes (`eztinker.api.anthropic`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from eztinker.api.not_served import RefusesNotServed
from eztinker.engine.errors import InvalidInputError

MAX_STOP_SEQUENCES = 16


class TextBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ContentBlock(BaseModel):
    """A message's content block of any type: only `text` ones are served (`Message.text` says so)."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]

    def text(self, where: str) -> str:
        """The message's text; a block of another type (image, tool_use, tool_result, document...) is
        refused naming it, never dropped."""
        if isinstance(self.content, str):
            return self.content
        for j, block in enumerate(self.content):
            if block.type != "text":
                raise InvalidInputError(
                    f"{where}.content[{j}]", f"{block.type!r} blocks are not served: send text"
                )
            if block.text is None:
                raise InvalidInputError(f"{where}.content[{j}].text", "is missing")
        return "".join(block.text or "" for block in self.content)


# Fields of Anthropic's that change what is generated (or counted) and that this server does not do
# (`RefusesNotServed`). Other unknown fields (`metadata`, `service_tier`...) change nothing.
NOT_SERVED: dict[str, tuple[tuple[Any, ...], str]] = {
    "tools": ((None, []), "tool use is not served: describe the tools in the system prompt"),
    "tool_choice": ((None, {"type": "auto"}, {"type": "none"}), "tool use is not served"),
    "thinking": ((None, {"type": "disabled"}), "extended thinking is not served"),
}


class CountTokensRequest(RefusesNotServed):
    """What `count_tokens` reads (`NOT_SERVED` lists the fields refused)."""

    NOT_SERVED = NOT_SERVED

    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None

    def system_text(self) -> str:
        if isinstance(self.system, list):
            return "".join(b.text for b in self.system)
        return self.system or ""


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    temperature: float = Field(1.0, ge=0, le=1)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False

    def stops(self) -> list[str]:
        stops = list(self.stop_sequences or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise InvalidInputError("stop_sequences", f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in stops):
            raise InvalidInputError("stop_sequences", "contains an empty string")
        return stops
