"""HTTPS on the HTTP port with a self-signed certificate: a real local Ray cluster whose Serve proxy terminates TLS
(`ServeConfig.ssl_keyfile/ssl_certfile`, `pdserve serve --ssl-keyfile/--ssl-certfile`), the official client
trusting that certificate, plain HTTP and untrusting clients refused."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import httpx
import openai
import pytest

from serving import free_port, stop_shared
from tiny_models import build_tiny_model

pytestmark = pytest.mark.slow


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


def test_https_with_a_self_signed_certificate(tmp_path: Path) -> None:
    import ray
    from ray import serve

    from pdserve.serve.app import build_app
    from pdserve.serve.config import ServeConfig

    key, cert = _self_signed(tmp_path)
    model = build_tiny_model(tmp_path / "model", "llama")
    config = ServeConfig(model=str(model), dtype="float32", colocated=True, served_model_name="tiny",
                         port=free_port(), ssl_keyfile=str(key), ssl_certfile=str(cert))  # fmt: skip
    stop_shared()  # Serve's HTTP options are the cluster's: this one starts its own
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options=config.http_options())
        serve.run(build_app(config), name="tls", route_prefix="/")
        base = f"https://127.0.0.1:{config.port}"
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert)), timeout=30) as trusting:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", http_client=trusting, max_retries=0)
            out = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=4, temperature=0)
            assert out.usage is not None and out.usage.completion_tokens == 4
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the certificate
            httpx.get(f"{base}/health", timeout=10)
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port
            httpx.get(f"http://127.0.0.1:{config.port}/health", timeout=10).raise_for_status()
    finally:
        serve.shutdown()
        ray.shutdown()


def test_tls_needs_both_files() -> None:
    from pdserve.serve.config import ServeConfig

    with pytest.raises(ValueError, match="both"):
        ServeConfig(ssl_keyfile="k.pem").http_options()
