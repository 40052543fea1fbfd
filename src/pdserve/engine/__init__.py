"""One replica's inference engine. Knows nothing about Ray or HTTP. `LLMEngine` (torch) is imported on first use:
the ingress and the router use the request types alone."""

from typing import TYPE_CHECKING

from pdserve.engine.errors import EngineDeadError, EngineUnavailableError, EngineWedgedError
from pdserve.engine.request import (
    EngineRequest,
    EngineStats,
    FinishReason,
    InvalidRequestError,
    KVReservation,
    LayerSink,
    RequestOutput,
    SamplingParams,
)
from pdserve.lazy import lazy_exports

if TYPE_CHECKING:
    from pdserve.engine.engine import LLMEngine

__getattr__ = lazy_exports(__name__, {"LLMEngine": "pdserve.engine.engine"})

__all__ = [
    "EngineDeadError",
    "EngineRequest",
    "EngineStats",
    "EngineUnavailableError",
    "EngineWedgedError",
    "FinishReason",
    "InvalidRequestError",
    "KVReservation",
    "LLMEngine",
    "LayerSink",
    "RequestOutput",
    "SamplingParams",
]
