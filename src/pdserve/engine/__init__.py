"""One replica's inference engine. Knows nothing about Ray or HTTP."""

from pdserve.engine.engine import LLMEngine
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

__all__ = [
    "EngineRequest",
    "EngineStats",
    "FinishReason",
    "InvalidRequestError",
    "KVReservation",
    "LLMEngine",
    "LayerSink",
    "RequestOutput",
    "SamplingParams",
]
