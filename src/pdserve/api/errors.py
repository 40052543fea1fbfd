"""Errors as OpenAI error bodies with the right status; HTTP errors live in api/ and nowhere else.

Every failure a client can see is `{"error": {"message", "type", "param", "code"}}`, typed by whose fault it is.
The client's: validation problems are 400 `invalid_request_error` naming the parameter (never a 422 or pydantic's
internals), input the backend rejects (`InvalidRequest`) 400, unknown routes 404. The server's (`server_error`): no
capacity 429/503 with Retry-After, a backend's `ServerError` 503 with Retry-After (or 500), and anything unexpected
a generic 500 in `UnhandledErrors` (middleware.py). No body carries an exception's text unless its type is one of the
contract's (backend.py), whose messages are written for clients: never a traceback or an internal address.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from opentelemetry import trace
from starlette.exceptions import HTTPException

from pdserve.api.backend import CapacityError, InvalidRequest, ServerError
from pdserve.api.protocol import REQUEST_FIELD_NAMES, ErrorBody, ErrorResponse, is_plain_name

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
# pydantic names union members in error locations ("prompt", "list[int]", 0); these are not parameter names.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "bytes", "none"})
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
_NOT_AN_OBJECT = "the request body must be a JSON object, sent with Content-Type: application/json"
INTERNAL_ERROR = "internal server error"


class APIError(Exception):
    """An error answered as OpenAI error JSON with `status`; raise it anywhere in api/."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after_s = retry_after_s  # sent as a Retry-After header (whole seconds, at least 1)

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code))


def error_response(error: APIError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    all_headers = dict(headers or {})
    if error.retry_after_s is not None:
        all_headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    return JSONResponse(error.body().model_dump(), status_code=error.status, headers=all_headers or None)


def install_error_handlers(app: FastAPI) -> None:
    """Answer validation errors, HTTP errors (unknown route, wrong method), APIError and the backend's errors
    (CapacityError, InvalidRequest, ServerError) as JSON."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        trace.get_current_span().record_exception(e)  # the request's span (middleware.RequestTelemetry)
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_errors(e.errors())
        error = APIError(400, message, param=param)
        trace.get_current_span().record_exception(error)
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = f"{e.detail}: {request.method} {request.url.path}"
        return error_response(APIError(e.status_code, message), headers=e.headers)

    async def backend_failed(_: Request, e: Exception) -> JSONResponse:
        trace.get_current_span().record_exception(e)
        return error_response(backend_error(e))

    for kind in (CapacityError, InvalidRequest, ServerError):
        app.add_exception_handler(kind, backend_failed)


def backend_error(e: Exception) -> APIError:
    """What the client sees of an exception out of the backend: the contract's errors with their messages, anything
    else as a generic 500 (its text may hold a traceback or an internal address, so it is never shown)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, CapacityError):
        return capacity_error(e)
    if isinstance(e, InvalidRequest):
        return APIError(400, str(e))
    if isinstance(e, ServerError):
        return server_error(e)
    return APIError(500, INTERNAL_ERROR, SERVER_ERROR)


def capacity_error(e: CapacityError) -> APIError:
    if e.status_code == 429:
        return APIError(429, str(e), "rate_limit_error", code="rate_limit_exceeded", retry_after_s=e.retry_after_s)
    return APIError(e.status_code, str(e), SERVER_ERROR, code="service_unavailable", retry_after_s=e.retry_after_s)


def server_error(e: ServerError) -> APIError:
    """503 with Retry-After when the backend says a retry may succeed, else 500."""
    if e.retry_after_s is None:
        return APIError(500, str(e), SERVER_ERROR)
    return APIError(503, str(e), SERVER_ERROR, code="service_unavailable", retry_after_s=e.retry_after_s)


def describe_validation_errors(errors: Sequence[Any]) -> tuple[str, str | None]:
    """A one-line message and the offending parameter (e.g. `messages[0].role`), without pydantic's internals."""
    # The deepest error is the most specific: for a union it names the member that came closest.
    depth = max(len(e.get("loc", ())) for e in errors)
    deepest = [e for e in errors if len(e.get("loc", ())) == depth]
    error, kind = deepest[0], deepest[0].get("type")
    if kind == "json_invalid":
        return "the request body is not valid JSON", None
    for e in errors:  # a field refused by name (protocol.py's UnknownFieldError, UnsupportedFieldError)
        cause = e.get("ctx", {}).get("error")
        if hasattr(cause, "param"):
            return str(cause), cause.param
    if kind == "extra_forbidden":  # a key no nested object defines (messages[0].tool_calls)
        at, key = _param_path(error.get("loc", ())[:-1]), error.get("loc", ())[-1]
        if isinstance(key, str) and is_plain_name(key):
            named = f"{at}.{key}" if at else key
            return f"unrecognized request argument supplied: {named}", named
        return "unrecognized request argument", at
    param = _param_path(error.get("loc", ()))
    if param is None:
        return ("the request body is missing", None) if kind == "missing" else (_NOT_AN_OBJECT, None)
    if kind == "missing":
        return f"'{param}' is required", param
    # Union members that failed alike ("a valid string", "a valid list") are all worth naming.
    causes = dict.fromkeys(_cause(e) for e in deepest if _param_path(e.get("loc", ())) == param)
    return f"invalid '{param}': {' or '.join(causes)}", param


def _cause(error: Any) -> str:
    if error.get("type") == "value_error":  # our validators' messages, without pydantic's "Value error, " prefix
        return str(error.get("ctx", {}).get("error"))
    return str(error.get("msg", "invalid value"))


def _param_path(loc: Sequence[int | str]) -> str | None:
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _IDENTIFIER.fullmatch(part) and part not in _TYPE_TAGS:
            if part not in REQUEST_FIELD_NAMES:  # a key of the client's own (logit_bias): never echoed back
                break
            path += f".{part}" if path else part
    return path or None
