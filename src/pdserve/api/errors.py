"""Errors as OpenAI error JSON with the right status; HTTP concerns live here and nowhere else."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdserve.api.backend import CapacityError
from pdserve.api.protocol import ErrorBody, ErrorResponse

logger = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_response(
    status: int,
    message: str,
    type: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_error(e)
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), kind)

    @app.exception_handler(CapacityError)
    async def no_capacity(_: Request, e: CapacityError) -> JSONResponse:
        headers = {"Retry-After": str(max(1, round(e.retry_after_s)))}
        return error_response(
            e.status_code, str(e), "rate_limit_error" if e.status_code == 429 else "server_error", headers=headers
        )

    @app.exception_handler(ValueError)
    async def rejected(_: Request, e: ValueError) -> JSONResponse:
        return error_response(400, str(e), "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception) -> JSONResponse:
        logger.exception("request failed")
        return error_response(500, "internal server error", "server_error")


def describe_validation_error(e: RequestValidationError) -> tuple[str, str | None]:
    """A one-line message and the offending parameter, without pydantic's internals."""
    first = e.errors()[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    fields = [str(part) for part in first.get("loc", ()) if part != "body" and not isinstance(part, int)]
    param = fields[0] if fields else None
    return f"invalid value for {param or 'the request body'}: {first.get('msg', 'invalid')}", param


class BodySizeLimit:
    """Refuses bodies over `max_bytes` with 413, by Content-Length or while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise APIError(413, f"request body exceeds {self.max_bytes} bytes")
            return message

        await self.app(scope, counting_receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, f"request body exceeds {self.max_bytes} bytes", "invalid_request_error")
        await response(scope, receive, send)
