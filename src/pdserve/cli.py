"""`pdserve serve`: start (or join) a Ray cluster, deploy the app, serve until interrupted."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path

import yaml

from pdserve.serve.config import APIKeyConfig, PoolConfig, RouterSettings, ServeConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    serve_cmd.add_argument("--model", default=None, help="local HF directory (default: SmolLM2-135M-Instruct)")
    serve_cmd.add_argument("--served-model-name", default=None)
    serve_cmd.add_argument("--num-prefill", type=int, default=1)
    serve_cmd.add_argument("--num-decode", type=int, default=1)
    serve_cmd.add_argument("--colocated", action="store_true", help="one engine pool, no disaggregation")
    serve_cmd.add_argument("--num-engines", type=int, default=1, help="replicas in colocated mode")
    serve_cmd.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    serve_cmd.add_argument("--max-model-len", type=int, default=None)
    serve_cmd.add_argument("--kv-transport", default="auto", choices=["auto", "shm", "tcp", "gloo", "nccl", "cuda_ipc"])
    serve_cmd.add_argument(
        "--routing-policy", default="cache_aware", choices=["cache_aware", "pow2"], help="see docs/ROUTER.md"
    )
    serve_cmd.add_argument(
        "--local-prefill-max-tokens",
        dest="local_threshold",
        type=int,
        default=None,
        help="a decode replica lacking at most this many prompt tokens prefills them itself (0: never)",
    )
    serve_cmd.add_argument(
        "--stream-interval", type=int, default=1, help="tokens per streamed message after the first (as vLLM's)"
    )
    serve_cmd.add_argument(
        "--api-key", action="append", default=[],
        help="require this key (Authorization: Bearer KEY) on every route but /health and /ready; repeatable; "
        "also PDSERVE_API_KEYS (comma-separated); these keys share the tenant 'default'",
    )  # fmt: skip
    serve_cmd.add_argument(
        "--api-keys-file", type=Path, default=None,
        help="YAML list of {key or key_sha256, tenant, requests_per_s, burst, max_concurrent} (docs/SECURITY.md)",
    )  # fmt: skip
    serve_cmd.add_argument("--ssl-keyfile", default=None, help="serve HTTPS: the private key (PEM), as vLLM's")
    serve_cmd.add_argument("--ssl-certfile", default=None, help="serve HTTPS: the certificate chain (PEM)")
    serve_cmd.add_argument("--host", default="127.0.0.1")
    serve_cmd.add_argument("--port", type=int, default=8000)
    serve_cmd.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServeConfig(
        model=args.model,
        served_model_name=args.served_model_name,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        colocated=args.colocated,
        prefill=PoolConfig(num_replicas=args.num_prefill),
        decode=PoolConfig(num_replicas=args.num_decode),
        engine=PoolConfig(num_replicas=args.num_engines),
        kv_transport=args.kv_transport,
        stream_interval=args.stream_interval,
        router=RouterSettings(policy=args.routing_policy, **_set(local_prefill_max_tokens=args.local_threshold)),
        host=args.host,
        port=args.port,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        api_keys=api_key_entries(args.api_key, args.api_keys_file, os.environ.get("PDSERVE_API_KEYS", "")),
    )
    run_server(config, args.address)


def api_key_entries(keys: list[str], keys_file: Path | None, env_keys: str) -> list[APIKeyConfig]:
    """Keys from the command line, the environment and a YAML file (only their SHA-256 is kept)."""
    plain = [*keys, *(k.strip() for k in env_keys.split(",") if k.strip())]
    entries = [APIKeyConfig.model_validate({"key": key}) for key in plain]
    if keys_file is not None:
        listed = yaml.safe_load(keys_file.read_text()) or []
        if not isinstance(listed, list):
            raise SystemExit(f"{keys_file}: expected a YAML list of keys")
        entries += [APIKeyConfig.model_validate(item) for item in listed]
    return entries


def _set(**options: object) -> dict[str, object]:
    """The options actually given (None: keep the config's default)."""
    return {k: v for k, v in options.items() if v is not None}


def run_server(config: ServeConfig, address: str | None) -> None:
    import ray
    from ray import serve

    from pdserve.serve.app import build_app

    ray.init(address=address, include_dashboard=False)
    serve.start(http_options=config.http_options())
    serve.run(build_app(config), name="pdserve", route_prefix="/")
    scheme = "https" if config.ssl_certfile else "http"
    print(f"pdserve is serving on {scheme}://{config.host}:{config.port}/v1 (Ctrl-C to stop)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
