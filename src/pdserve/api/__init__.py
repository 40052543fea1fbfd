"""The OpenAI-compatible HTTP layer: protocol models, routes, SSE, errors. Knows HTTP and pydantic, not torch."""

from pdserve.api.app import create_app
from pdserve.api.backend import (
    Backend,
    CapacityError,
    GenerationDelta,
    GenerationRequest,
    InvalidRequest,
    ServerError,
)
from pdserve.api.detokenizer import IncrementalDetokenizer
from pdserve.api.errors import APIError

__all__ = [
    "APIError",
    "Backend",
    "CapacityError",
    "GenerationDelta",
    "GenerationRequest",
    "IncrementalDetokenizer",
    "InvalidRequest",
    "ServerError",
    "create_app",
]
