"""The request bodies of the Anthropic Messages routes (`eztinker.api.anthropic`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from eztinker.engine.errors import InvalidInputError

MAX_STOP_SEQUENCES = 16


class TextBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["user", "assistant"]
    content: str | list[TextBlock]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)


class CountTokensRequest(BaseModel):
    """What `count_tokens` reads; unknown fields Anthropic defines (`metadata`, `tools`...) are ignored."""

    model_config = ConfigDict(extra="ignore")

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
