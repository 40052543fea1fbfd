"""The OpenAI-compatible HTTP layer: protocol models, routes, SSE, errors. Knows HTTP and pydantic, not torch."""

from pdserve.api.app import create_app
from pdserve.api.backend import Backend, CapacityError, GenerationDelta, GenerationRequest

__all__ = ["Backend", "CapacityError", "GenerationDelta", "GenerationRequest", "create_app"]
