"""Errors typed by origin: the client's 4xx with their message, the server's 5xx (503 + Retry-After when a retry may
succeed) with a generic one, and no traceback or internal address in any body, before the headers or in a stream.

Over the HTTP app with test_api's fake backend (no Ray cluster), plus the ingress's translation of what a replica (or
Ray) raises into the Backend contract's errors, with real RayTaskError wrappers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray.exceptions import ActorDiedError, RayTaskError

from pdserve.api import CapacityError, GenerationRequest, InvalidRequest, ServerError, create_app
from pdserve.engine import EngineRequest, InvalidRequestError, LLMEngine, RequestOutput, SamplingParams
from pdserve.router.admission import Admission
from pdserve.serve.ingress import Ingress, classify_error
from pdserve.transfer.base import TransferError
from test_api import FakeBackend, serve, sse_payloads
from tiny_models import build_tokenizer

COMPLETIONS = "/v1/completions"
REPLICA_IP = "10.0.3.7"
# What str() of a Ray-wrapped replica error looks like: a traceback naming files, the process and the node's address.
RAY_TEXT = (
    f"ray::ServeReplica:default:Decode.decode() (pid=4242, ip={REPLICA_IP}, actor_id=ab12)\n"
    "Traceback (most recent call last):\n"
    '  File "/opt/pdserve/src/pdserve/serve/replicas.py", line 297, in decode\n'
    f"    raise ValueError(...)\nValueError: request 'cmpl-1': KV transfer incomplete (peer {REPLICA_IP}:5701)"
)
LEAKS = ("Traceback", "KV transfer", "replicas.py", "10.0.", "127.0.0.1", "pid=", "secret")
GENERIC_500 = {"message": "internal server error", "type": "server_error", "param": None, "code": None}


def ray_wrapped(cause: Exception, traceback: str = RAY_TEXT) -> RayTaskError:
    """What a handle raises for `cause` raised in a replica: a RayTaskError that is also an instance of its type
    (a plain RayTaskError when `cause` is itself a wrapper: Ray cannot derive from two wrapper classes)."""
    error = RayTaskError("decode", traceback, cause, proctitle="ray::ServeReplica", pid=4242, ip=REPLICA_IP)
    wrapped = error.as_instanceof_cause()
    assert isinstance(wrapped, RayTaskError) and (isinstance(wrapped, type(cause)) or isinstance(cause, RayTaskError))
    return wrapped


def _unpicklable(error: Exception) -> Exception:
    error.lock = threading.Lock()  # type: ignore[attr-defined]
    return error


def assert_no_leak(text: str) -> None:
    assert not any(leak in text for leak in LEAKS), text


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, FakeBackend]]:
    backend = FakeBackend(build_tokenizer(tmp_path_factory.mktemp("tokenizer")))
    with serve(create_app(backend)) as url:
        yield url, backend


@pytest.fixture
def backend(server: tuple[str, FakeBackend]) -> FakeBackend:
    server[1].reset()
    return server[1]


@pytest.fixture
def http(server: tuple[str, FakeBackend], backend: FakeBackend) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0], timeout=5) as client:
        yield client


def post(http: httpx.Client, stream: bool) -> httpx.Response:
    return http.post(COMPLETIONS, json={"model": "fake-model", "prompt": "hi", "max_tokens": 8, "stream": stream})


# --- before the headers: the status says whose fault it is ---------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "error",
    [
        ValueError(RAY_TEXT),  # a server fault that happens to be a ValueError: not the client's
        RuntimeError(f"secret internals at {REPLICA_IP}"),
        ray_wrapped(ValueError("request 'cmpl-1': KV transfer incomplete")),
        ray_wrapped(InvalidRequestError("prompt is empty")),  # untranslated: the backend broke the contract
        ActorDiedError(),
    ],
    ids=["value-error", "runtime-error", "ray-value-error", "ray-engine-invalid", "actor-died"],
)
def test_unknown_backend_errors_are_a_generic_500(
    http: httpx.Client, backend: FakeBackend, error: Exception, stream: bool
) -> None:
    backend.reset(error=error)
    response = post(http, stream)
    assert response.status_code == 500 and response.json() == {"error": GENERIC_500}
    assert "retry-after" not in response.headers
    assert_no_leak(response.text)


@pytest.mark.parametrize("stream", [False, True])
def test_invalid_request_is_a_400_with_its_message(http: httpx.Client, backend: FakeBackend, stream: bool) -> None:
    backend.reset(error=InvalidRequest("prompt token ids must be in [0, 100)"))
    response = post(http, stream)
    error = {"message": "prompt token ids must be in [0, 100)", "type": "invalid_request_error", "param": None}
    assert response.status_code == 400 and response.json()["error"] == {**error, "code": None}


@pytest.mark.parametrize("stream", [False, True])
def test_server_error_is_a_503_with_retry_after_or_a_500(
    http: httpx.Client, backend: FakeBackend, stream: bool
) -> None:
    message = "internal error while generating; request id cmpl-1"
    backend.reset(error=ServerError(message, retry_after_s=1.0))
    response = post(http, stream)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    error = {"message": message, "type": "server_error", "param": None, "code": "service_unavailable"}
    assert response.json()["error"] == error
    backend.reset(error=ServerError(message, retry_after_s=2.5))
    assert post(http, stream).headers["retry-after"] == "3"  # whole seconds, rounded up
    backend.reset(error=ServerError(message))  # no retry_after_s: retrying would not help
    response = post(http, stream)
    assert response.status_code == 500 and "retry-after" not in response.headers
    assert response.json()["error"] == {"message": message, "type": "server_error", "param": None, "code": None}


def test_abort_by_the_backend_is_a_503_with_retry_after(http: httpx.Client, backend: FakeBackend) -> None:
    backend.finish_override = "abort"
    response = post(http, stream=False)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "service_unavailable"


def test_a_broken_chat_template_is_the_servers_fault(tmp_path: Path) -> None:
    tokenizer = build_tokenizer(tmp_path)
    tokenizer.chat_template = "{% for m in messages %}{{ m.content }{% endfor %}"  # a syntax error
    messages = [{"role": "user", "content": "hi"}]
    with serve(create_app(FakeBackend(tokenizer))) as url:
        response = httpx.post(f"{url}/v1/chat/completions", json={"model": "fake-model", "messages": messages})
    assert response.status_code == 500 and response.json() == {"error": GENERIC_500}
    tokenizer.chat_template = '{{ raise_exception("Conversation roles must alternate") }}'  # the client's fault
    with serve(create_app(FakeBackend(tokenizer))) as url:
        response = httpx.post(f"{url}/v1/chat/completions", json={"model": "fake-model", "messages": messages})
    assert response.status_code == 400 and "roles must alternate" in response.json()["error"]["message"]


# --- after the headers: an error event, as generic -----------------------------------------------------------------


def stream_error(http: httpx.Client) -> tuple[dict[str, Any], httpx.Response]:
    response = post(http, stream=True)
    assert response.status_code == 200
    events = sse_payloads(response)
    assert json.loads(events[0])["choices"][0]["text"] == "The" and events[-1] == "[DONE]"
    [error] = [json.loads(e)["error"] for e in events[1:-1]]
    return error, response


@pytest.mark.parametrize(
    "error",
    [ValueError(RAY_TEXT), RuntimeError(f"secret at {REPLICA_IP}"), ray_wrapped(TransferError("peer gone"))],
    ids=["value-error", "runtime-error", "ray-transfer-error"],
)
def test_mid_stream_errors_are_generic_events(http: httpx.Client, backend: FakeBackend, error: Exception) -> None:
    backend.error_after = error
    event, response = stream_error(http)
    assert event == GENERIC_500
    assert_no_leak(response.text)
    assert backend.num_closed == 1


def test_mid_stream_contract_errors_keep_their_type(http: httpx.Client, backend: FakeBackend) -> None:
    backend.error_after = ServerError("internal error while generating; request id cmpl-1", retry_after_s=1.0)
    event, _ = stream_error(http)
    assert (event["type"], event["code"]) == ("server_error", "service_unavailable")
    assert event["message"] == "internal error while generating; request id cmpl-1"
    backend.reset()
    backend.error_after = InvalidRequest("stop_token_ids must be in [0, 100)")
    event, _ = stream_error(http)
    assert (event["type"], event["message"]) == ("invalid_request_error", "stop_token_ids must be in [0, 100)")


# --- the ingress's translation of replica and Ray errors -----------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        InvalidRequestError("top_p must be in (0, 1], got 0.0"),
        ray_wrapped(InvalidRequestError("top_p must be in (0, 1], got 0.0")),
        ray_wrapped(ray_wrapped(InvalidRequestError("top_p must be in (0, 1], got 0.0"))),  # through two replicas
        RayTaskError("decode", RAY_TEXT, InvalidRequestError("top_p must be in (0, 1], got 0.0"), "p", 1, REPLICA_IP),
    ],
    ids=["local", "ray", "ray-twice", "ray-plain-wrapper"],
)
def test_engine_input_errors_become_invalid_request(error: Exception) -> None:
    translated = classify_error(error, "cmpl-1")
    assert type(translated) is InvalidRequest and str(translated) == "top_p must be in (0, 1], got 0.0"


@pytest.mark.parametrize(
    "error",
    [
        ValueError("request 'cmpl-1' has no open reservation on replica r1"),
        ray_wrapped(ValueError("request 'cmpl-1': KV transfer incomplete (epoch 3 not on every block)")),
        ray_wrapped(TransferError(f"peer {REPLICA_IP} unreachable")),
        RuntimeError(RAY_TEXT),
        ActorDiedError(),
        RayTaskError("decode", RAY_TEXT, ValueError("x"), "p", 1, REPLICA_IP),  # a wrapper that is not a ValueError
        # Ray carries an unpicklable cause as a RayError holding the traceback
        RayTaskError("decode", RAY_TEXT, _unpicklable(InvalidRequestError("x")), "p", 1, REPLICA_IP),
    ],
    ids=["value-error", "ray-value-error", "ray-transfer", "runtime", "actor-died", "ray-plain", "ray-unpicklable"],
)
def test_server_faults_become_a_generic_server_error(error: Exception, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="pdserve.serve.ingress"):
        translated = classify_error(error, "cmpl-1")
    assert type(translated) is ServerError and translated.retry_after_s == 1.0
    assert str(translated) == "internal error while generating; request id cmpl-1"
    [record] = caplog.records  # the original, with its traceback, goes to the server's log only
    assert record.exc_info is not None and record.exc_info[1] is error and "cmpl-1" in record.getMessage()


def test_capacity_and_server_errors_pass_without_ray_text() -> None:
    local = CapacityError("no decode replica has room for this request now", retry_after_s=2.0, status_code=503)
    assert classify_error(local, "cmpl-1") is local
    remote = classify_error(ray_wrapped(local), "cmpl-1")
    assert type(remote) is CapacityError and str(remote) == str(local)
    assert (remote.retry_after_s, remote.status_code) == (2.0, 503)
    server = ServerError("the decode pool is draining; retry", retry_after_s=5.0)
    assert classify_error(server, "cmpl-1") is server
    remote_server = classify_error(ray_wrapped(server), "cmpl-1")
    assert type(remote_server) is ServerError and str(remote_server) == str(server)
    assert remote_server.retry_after_s == 5.0


class _FailingStream:
    """A replica's output stream as a handle returns it, raising `error` after yielding `outputs`."""

    def __init__(self, outputs: list[RequestOutput], error: Exception) -> None:
        self.outputs, self.error, self.is_cancelled = outputs, error, False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._run()

    async def _run(self) -> AsyncIterator[RequestOutput]:
        for out in self.outputs:
            yield out
        raise self.error

    def cancel(self) -> None:
        self.is_cancelled = True


class _Handle:
    def __init__(self, stream: _FailingStream) -> None:
        self.stream = stream
        self.generate = self

    def options(self, **_: Any) -> _Handle:
        return self

    def remote(self, _: EngineRequest) -> _FailingStream:
        return self.stream


class _ColocatedIngress:
    """What `Ingress.generate` reads of its replica in colocated mode, without Ray Serve."""

    router = None
    channels = None  # outputs on the call itself (as with output_channels off)
    broken = None  # no replica to route around
    _admit = Ingress._admit
    _finish = Ingress._finish

    def __init__(self, stream: _FailingStream) -> None:
        self.engine = _Handle(stream)
        self.admission = Admission(1 << 30)

    def _observe_first(self, *_: Any) -> None:
        pass

    def _observe_end(self, *_: Any) -> None:
        pass


def gen_request() -> GenerationRequest:
    return GenerationRequest("cmpl-7", [5, 6], 4, 0.0, 1.0, 0, None, [], False, 0, False)


async def drain(ingress: _ColocatedIngress) -> list[Any]:
    return [delta async for delta in Ingress.generate(ingress, gen_request())]  # type: ignore[arg-type]


async def _translated(num_outputs: int, error: Exception) -> BaseException:
    outputs = [RequestOutput("cmpl-7", [9], None, None, 2, 0)][:num_outputs]
    stream = _FailingStream(outputs, error)
    with pytest.raises(Exception) as raised:
        await drain(_ColocatedIngress(stream))
    assert stream.is_cancelled
    return raised.value


@pytest.mark.parametrize("num_outputs", [0, 1])
def test_ingress_generate_raises_contract_errors(num_outputs: int) -> None:
    server = asyncio.run(_translated(num_outputs, ray_wrapped(ValueError("KV transfer incomplete"))))
    assert type(server) is ServerError and "cmpl-7" in str(server) and server.retry_after_s == 1.0
    assert server.__cause__ is None and server.__suppress_context__  # Ray's text is not chained along
    client = asyncio.run(_translated(num_outputs, ray_wrapped(InvalidRequestError("prompt is empty"))))
    assert type(client) is InvalidRequest and str(client) == "prompt is empty"


# --- the engine types the client's input errors --------------------------------------------------------------------


def test_sampling_params_raise_invalid_request_error() -> None:
    with pytest.raises(InvalidRequestError, match="top_p"):
        SamplingParams(top_p=0.0).validate()
    assert issubclass(InvalidRequestError, ValueError)  # callers catching ValueError still do


def test_engine_validation_types_client_input_only(tiny_models: dict[str, Path]) -> None:
    from pdserve.config import CacheConfig, EngineConfig, ModelConfig

    engine = LLMEngine(EngineConfig(ModelConfig(str(tiny_models["llama"]), dtype="float32"), CacheConfig(num_blocks=8)))
    for prompt, params in [((), SamplingParams()), ((10**6,), SamplingParams()), ((5,), SamplingParams(max_tokens=0))]:
        with pytest.raises(InvalidRequestError):
            engine.add_request(EngineRequest("bad", prompt, params))
    engine.add_request(EngineRequest("a", (5, 6), SamplingParams(max_tokens=2)))
    with pytest.raises(ValueError, match="already in use") as raised:  # ids are the server's: not the client's fault
        engine.add_request(EngineRequest("a", (5, 6), SamplingParams(max_tokens=2)))
    assert not isinstance(raised.value, InvalidRequestError)
