"""Server-side custom losses (the SDK's `create_custom_loss`): stored per owner, resolved to a token loss.

An uploaded graph is checked by `eztinker.engine.loss_graph` and kept in the store (so a loss id outlives
a restart), under a random id only ever told to its owner. `forward_backward(loss_fn="custom",
loss_fn_config={"loss_id": id})` resolves to a `TokenLoss` carrying the checked graph as data, after the
one ownership check (`Access.require`): another key's loss id is answered exactly like a missing one.
Because the graph travels with the op, every backend computes it the same way (`--workers ray`
included), and nothing is registered by name: the ``custom/`` names are reserved (a `loss_fn` naming one
directly is refused as unknown, and none is ever listed).
"""

from __future__ import annotations

import threading
import uuid
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from eztinker.engine.errors import InvalidInputError, NotFoundError, UnknownLossError
from eztinker.engine.loss_graph import LossGraph, parse_loss_graph
from eztinker.engine.losses.registry import PRIVATE_PREFIX
from eztinker.engine.types import Datum, TokenLoss
from eztinker.service.errors import QuotaExceededError
from eztinker.store.facade import FacadeState

if TYPE_CHECKING:
    from eztinker.service import Service

PREFIX = PRIVATE_PREFIX  # never listed (see eztinker.engine.losses.registry)
MAX_LOSSES_PER_OWNER = 1024  # a custom loss is small, but kept for the store's life
NAMESPACE = "custom_loss"  # FacadeState: loss id -> {"name", "inputs", "graph"} as uploaded, with its owner


@dataclass(frozen=True)
class StoredLoss:
    loss_id: str
    owner: str | None
    graph: LossGraph


class CustomLosses:
    """The custom losses uploaded to one service, by id: durable in the store, parsed once per process."""

    def __init__(self, service: Service) -> None:
        self._service = weakref.ref(service)
        self._durable = FacadeState(service.store)
        self._parsed: dict[str, StoredLoss] = {}
        self._lock = threading.Lock()

    def create(
        self, owner: str | None, name: str, inputs: Sequence[Mapping[str, Any]], graph: Mapping[str, Any]
    ) -> str:
        """Check and store a graph; its new loss id. `InvalidInputError` names what is not allowed."""
        parsed = parse_loss_graph(name, inputs, graph)
        with self._lock:
            held = len(self._durable.records(NAMESPACE, owner=owner))
            if held >= MAX_LOSSES_PER_OWNER:
                raise QuotaExceededError(f"this key already holds {held} custom losses, the most one key may")
            loss_id = f"loss-{uuid.uuid4().hex}"
            upload = {"name": name, "inputs": list(inputs), "graph": dict(graph)}
            self._durable.put(NAMESPACE, loss_id, upload, owner=owner)
            self._parsed[loss_id] = StoredLoss(loss_id, owner, parsed)
        return loss_id

    def get(self, loss_id: str, caller: str | None) -> StoredLoss:
        """The caller's loss `loss_id`; another key's is answered like a missing one."""
        missing = f"no custom loss {loss_id!r}"
        with self._lock:
            stored = self._parsed.get(loss_id)
        if stored is None:
            record = self._durable.get(NAMESPACE, loss_id)
            if record is None:
                raise NotFoundError(missing)
            upload = record.value  # checked when it was uploaded; parsed again after a restart
            graph = parse_loss_graph(upload["name"], upload["inputs"], upload["graph"])
            stored = StoredLoss(loss_id, record.owner, graph)
            with self._lock:
                self._parsed[loss_id] = stored
        service = self._service()
        assert service is not None
        service.access.require(stored.owner, caller, missing)
        return stored

    def resolve(
        self, loss_fn: str, config: Mapping[str, Any], data: Sequence[Datum], caller: str | None
    ) -> tuple[list[Datum], TokenLoss]:
        """The engine data and loss of a Tinker `forward_backward`: a built-in by name, or the caller's
        custom loss (`loss_fn="custom"`, `loss_fn_config={"loss_id": id}`), whose data keep only
        `target_tokens` and the inputs the loss reads (the SDK sends every `loss_fn_inputs` key)."""
        if loss_fn.startswith(PREFIX):
            raise UnknownLossError("loss_fn", f"unknown loss_fn {loss_fn!r}")
        if loss_fn != "custom":
            return list(data), TokenLoss(loss_fn, config)
        loss_id = config.get("loss_id")
        if not isinstance(loss_id, str) or set(config) != {"loss_id"}:
            raise InvalidInputError("loss_fn_config", 'loss_fn "custom" takes exactly {"loss_id": <id>}')
        stored = self.get(loss_id, caller)
        keep = {"target_tokens", *stored.graph.loss_fn_inputs}
        kept = [replace(d, loss_inputs={k: v for k, v in d.loss_inputs.items() if k in keep}) for d in data]
        return kept, TokenLoss(PREFIX + stored.loss_id, graph=stored.graph)


_BY_SERVICE: weakref.WeakKeyDictionary[Any, CustomLosses] = weakref.WeakKeyDictionary()
_BY_SERVICE_LOCK = threading.Lock()


def custom_losses(service: Service) -> CustomLosses:
    """The service's custom losses (made on first use)."""
    with _BY_SERVICE_LOCK:
        losses = _BY_SERVICE.get(service)
        if losses is None:
            losses = _BY_SERVICE[service] = CustomLosses(service)
        return losses
