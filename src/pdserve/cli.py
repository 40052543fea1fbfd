"""`pdserve serve [MODEL]`: start (or join) a Ray cluster, deploy the app, serve until interrupted.

MODEL is a local HF checkpoint directory, a Hugging Face hub id (org/name: the HF cache, downloaded when missing;
HF_HUB_OFFLINE=1 reads the cache only) or SmolLM2-135M-Instruct (the default). Every ServeConfig field is a flag,
generated from the config model with its description as the help: top-level fields as `--max-num-seqs`, nested
ones dotted (`--prefill.num-replicas`, `--router.policy`). Settings also come from a YAML file (`--config`, a whole
ServeConfig) and the environment (`PDSERVE_MAX_NUM_SEQS=8`, `PDSERVE_PREFILL__NUM_REPLICAS=2`; lists comma-separated,
mappings as JSON). Precedence: flags > environment > file > defaults; API keys add up from every source.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import signal
import socket
import threading
import time
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import AliasChoices, BaseModel, ValidationError
from pydantic.fields import FieldInfo

from pdserve.serve.config import APIKeyConfig, ServeConfig

ENV_PREFIX = "PDSERVE_"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # end the command as Ctrl-C does
# Flags that are not the field's name: vLLM's spelling first, then the older spellings scripts and docs use.
FLAG_NAMES = {
    "served_model_names": ["--served-model-name"],
    "api_keys": ["--api-key"],
    "prefill.num_replicas": ["--prefill.num-replicas", "--num-prefill"],
    "decode.num_replicas": ["--decode.num-replicas", "--num-decode"],
    "engine.num_replicas": ["--engine.num-replicas", "--num-engines"],
    "router.policy": ["--router.policy", "--routing-policy"],
    "router.local_prefill_max_tokens": ["--router.local-prefill-max-tokens", "--local-prefill-max-tokens"],
}

# PDSERVE_ variables that are not ServeConfig fields (read where they act: faults.py, tracing.py, the KV secret, the
# native kernels' and models' caches).
OTHER_VARIABLES = frozenset({
    "API_KEYS", "FAULTS", "KV_SECRET", "CACHE_DIR", "KERNEL_CACHE_DIR", "NATIVE_KERNELS",
    "TRACES_FILE", "TRACES_CONSOLE",
})  # fmt: skip

Kind = Literal["switch", "list", "json", "keys", "value"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Option:
    """One ServeConfig field (nested ones by their path) as a command-line flag and an environment variable."""

    path: tuple[str, ...]  # ("prefill", "num_replicas")
    field: FieldInfo
    kind: Kind  # switch: --x/--no-x; list: several values; json: a mapping; keys: repeatable API keys
    choices: tuple[str, ...] | None  # a Literal's values

    @property
    def dest(self) -> str:
        return ".".join(self.path)

    @property
    def flags(self) -> list[str]:
        return FLAG_NAMES.get(self.dest, ["--" + self.dest.replace("_", "-")])

    @property
    def env(self) -> str:
        return ENV_PREFIX + "__".join(self.path).upper()

    @property
    def allows_none(self) -> bool:
        return type(None) in get_args(self.field.annotation)


def config_options(model: type[BaseModel] = ServeConfig, prefix: tuple[str, ...] = ()) -> list[Option]:
    """Every field of `model`, nested models walked into, in declaration order."""
    options: list[Option] = []
    for name, field in model.model_fields.items():
        annotation = _without_none(field.annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            options += config_options(annotation, (*prefix, name))
            continue
        origin, args = get_origin(annotation), get_args(annotation)
        choices = tuple(str(a) for a in args) if origin is Literal else None
        kind: Kind = "value"
        if annotation is bool:
            kind = "switch"
        elif origin is dict:
            kind = "json"
        elif origin is list:
            kind = "keys" if args == (APIKeyConfig,) else "list"
        options.append(Option((*prefix, name), field, kind, choices))
    return options


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The `pdserve` parser and its `serve` subcommand's."""
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        usage="pdserve serve [MODEL] [options]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("model_tag", nargs="?", metavar="MODEL", help="the model (same as --model)")
    serve.add_argument("--config", type=Path, help="a ServeConfig YAML file; the environment and flags override it")
    serve.add_argument(
        "--api-keys-file", type=Path, default=None,
        help="YAML list of {key or key_sha256, tenant, requests_per_s, burst, max_concurrent} (docs/SECURITY.md)",
    )  # fmt: skip
    serve.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    groups: dict[str, Any] = {}
    for option in config_options():
        group: Any = serve
        if len(option.path) > 1:
            section = option.path[0]
            if section not in groups:
                field = ServeConfig.model_fields[section]
                groups[section] = serve.add_argument_group(f"--{section}.*", _escape(field.description or ""))
            group = groups[section]
        group.add_argument(*option.flags, dest=option.dest, default=argparse.SUPPRESS, **_flag_kind(option))
    return parser, serve


def serve_config(args: argparse.Namespace, environ: Mapping[str, str]) -> ServeConfig:
    """The ServeConfig of a parsed command line: defaults < `--config` file < environment < flags."""
    data: dict[str, Any] = {}
    if args.config is not None:
        loaded = _read_yaml(args.config, "--config")
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: expected a YAML mapping of ServeConfig fields")
        data = _by_field_name(loaded)
    given = vars(args)
    if args.model_tag is not None:
        if given.get("model", args.model_tag) != args.model_tag:
            raise ValueError(f"two models given: {args.model_tag!r} and --model {given['model']!r}")
        given = {**given, "model": args.model_tag}
    for option in config_options():
        if option.kind == "keys":
            continue
        if environ.get(option.env):
            try:
                _put(data, option.path, _from_env(option, environ[option.env]))
            except ValueError as e:  # JSON's errors among them
                raise ValueError(f"{option.env}: {e}") from None
        if option.dest in given:
            _put(data, option.path, _from_flag(option, given[option.dest]))
    _warn_unknown_variables(environ)
    keys = api_key_entries(given.get("api_keys", []), args.api_keys_file, environ.get(ENV_PREFIX + "API_KEYS", ""))
    listed = data.get("api_keys") or []  # `api_keys:` with nothing after it is none
    if not isinstance(listed, list):
        raise ValueError(f"api_keys is a list of keys, not {type(listed).__name__}")
    data["api_keys"] = [*listed, *(key.model_dump() for key in keys)]
    return ServeConfig.model_validate(data)


def _warn_unknown_variables(environ: Mapping[str, str]) -> None:
    """A misspelled PDSERVE_ variable changed nothing without a word (PDSERVE_SERVED_MODEL_NAME for the field
    served_model_names): name it, with the closest known one, as vLLM warns of unknown VLLM_ variables."""
    known = {option.env for option in config_options()} | {ENV_PREFIX + name for name in OTHER_VARIABLES}
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            logger.warning("%s is not a pdserve setting and is ignored%s", name, hint)


def main(argv: list[str] | None = None) -> None:
    parser, serve = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = serve_config(args, os.environ)
        if not is_ray_client(args.address):  # over Ray Client the paths are the cluster's, not this machine's
            config = config.with_absolute_paths()
            config.check_tls_files()  # this node runs a proxy, which reads them: said before a model's download
        model_path = config.resolve_model_path()  # before Ray starts: a download or conversion shows its progress
    except ValidationError as exc:
        serve.error("\n  ".join(["invalid settings:", *map(_describe, exc.errors())]))
    except ValueError as exc:
        serve.error(str(exc))
    try:
        run_server(config, args.address, model_path)
    except ValidationError as exc:  # settings valid alone but not on this cluster (e.g. nccl with no GPU)
        serve.error("\n  ".join(["invalid settings for this cluster:", *map(_describe, exc.errors())]))
    except (ValueError, RuntimeError) as exc:  # refused to deploy, or the deploy failed (run_server cleaned up)
        serve.error(str(exc))


def api_key_entries(keys: list[str], keys_file: Path | None, env_keys: str) -> list[APIKeyConfig]:
    """Keys from the command line, the environment and a YAML file (only their SHA-256 is kept)."""
    plain = [*keys, *(k.strip() for k in env_keys.split(",") if k.strip())]
    entries = [APIKeyConfig.model_validate({"key": key}) for key in plain]
    if keys_file is not None:
        listed = _read_yaml(keys_file, "--api-keys-file") or []
        if not isinstance(listed, list):
            raise ValueError(f"{keys_file}: expected a YAML list of keys")
        for i, item in enumerate(listed):
            try:
                entries.append(APIKeyConfig.model_validate(item))
            except ValidationError as e:  # said without the entry: it holds a key
                problems = "; ".join(_describe(error) for error in e.errors())
                raise ValueError(f"{keys_file}: entry {i}: {problems}") from None
    return entries


def _read_yaml(path: Path, flag: str) -> Any:
    """A YAML file named by `flag`; ValueError (said as the flag's) when it cannot be read or parsed."""
    try:
        return yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ValueError(f"{flag} {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{flag} {path}: not valid YAML: {e}") from None


def run_server(config: ServeConfig, address: str | None, model_path: str | None = None) -> None:
    import ray
    from ray import serve

    from pdserve.serve import cluster_store
    from pdserve.serve.app import build_app, deploy_application
    from pdserve.serve.process import quiet_serve_env

    joining = cluster_to_join(address)
    if joining is None:  # a cluster this call starts (one it joins took its environment when it started)
        check_port_free(config.host, config.port)
        quiet_serve_env()
    else:
        logger.info("joining the Ray cluster at %s (--address local starts a new one)", joining)
    ray.init(address=address, include_dashboard=False)
    deploying = started_serve = False
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:  # however it ends (Ctrl-C, SIGTERM or SIGHUP, a refusal, a failed deploy), what this call set up goes
        # SIGTERM ends it as Ctrl-C does, deploying or serving (a handler set once serving let a SIGTERM during a
        # minutes-long deploy kill the process and leave the app on a joined cluster; found in review); so does
        # SIGHUP (an SSH session to a `ray up` head closing: the app kept its replicas and GPUs)
        for sig in STOP_SIGNALS:
            if previous[sig] is not signal.SIG_IGN:  # `nohup pdserve serve` keeps serving after its terminal closes
                signal.signal(sig, _interrupt)
        if joining is not None:
            started_serve = check_joined_serve(config)
        serve.start(http_options=config.http_options())
        if config.autoscaling.enabled:  # Serve takes an application's autoscaling policy only from a deploy config
            from ray.serve.context import _get_global_client
            from ray.serve.schema import ServeDeploySchema

            client = _get_global_client()
            assert client is not None  # serve.start made it
            others = sorted(set(serve.status().applications) - {"pdserve"})
            if others:  # a deploy config is the cluster's whole list of applications
                raise ValueError(f"autoscaling deploys a Serve config, which would delete this cluster's {others}")
            schema = ServeDeploySchema(applications=[deploy_application(config)])
            # The app is built on the cluster, in a process without this one's environment: the exporters'
            # headers are stored for it here (a joined cluster's replicas exported without them; found in review).
            cluster_store.publish_tracing_secrets(config.tracing_env)
            deploying = True
            # Not `_blocking`: it gives up after 60 s, and a model's load and first kernel build can take longer.
            client.deploy_apps(schema)
            _wait_until_running("pdserve")
        else:
            app = build_app(config, model_path)
            deploying = True
            serve.run(app, name="pdserve", route_prefix="/")
        scheme = "https" if config.ssl_certfile else "http"
        print(f"pdserve is serving on {scheme}://{config.host}:{config.port}/v1 (Ctrl-C to stop)", flush=True)
        threading.Event().wait()  # until Ctrl-C, SIGTERM or SIGHUP
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM or SIGHUP, serving or still deploying
        pass
    finally:
        if joining is None:
            serve.shutdown()
        else:  # a cluster this call joined: its other applications stay, and Serve unless this call started it
            if deploying:
                serve.delete("pdserve")
            if started_serve and not serve.status().applications:
                serve.shutdown()
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_joined_serve(config: ServeConfig) -> bool:
    """On a joined cluster, before anything is deployed: True when Serve is not running there yet (this call starts
    it). ValueError when the cluster runs an application named pdserve (deploying would replace it, someone's
    `serve deploy`, and the exit delete it), or when its running Serve listens elsewhere than this config asks:
    Serve keeps the HTTP options it started with (a new `--port` or TLS was ignored with a log line, while the
    command printed the URL it asked for)."""
    from ray import serve
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return True
    if "pdserve" in serve.status().applications:
        raise ValueError(
            "this Ray cluster already runs an application named pdserve (`serve status`): delete it first "
            "(`serve shutdown` or `serve delete pdserve`), or start a cluster of its own with --address local"
        )
    running = client.http_config
    wanted = config.http_options()
    have = {"host": running.host, "port": running.port, "ssl_keyfile": running.ssl_keyfile,
            "ssl_certfile": running.ssl_certfile}  # fmt: skip

    def same(name: str) -> bool:
        if name.startswith("ssl_") and have[name] and wanted.get(name):  # one file, however each spelled it
            return os.path.realpath(os.path.expanduser(have[name])) == os.path.realpath(wanted[name])
        return bool(wanted.get(name) == have[name])

    differ = [name for name in have if not same(name)]
    if differ:
        scheme = "https" if running.ssl_certfile else "http"
        raise ValueError(
            f"Serve on this Ray cluster already listens on {scheme}://{running.host}:{running.port} and keeps the "
            f"HTTP options it started with: pass --host {running.host} --port {running.port}"
            + (" and its TLS files" if running.ssl_certfile else "")
            + f" (this call asked for {', '.join(f'{k}={wanted.get(k)}' for k in differ)})"
        )
    return False


def _ray_address(address: str | None) -> str | None:
    """The address `ray.init(address)` goes by: RAY_ADDRESS stands for one left out or "auto"."""
    return (os.environ.get("RAY_ADDRESS") or address) if address in (None, "auto") else address


def is_ray_client(address: str | None) -> bool:
    """Whether `ray.init(address)` connects through Ray Client (ray://...): a remote cluster."""
    return "://" in (_ray_address(address) or "")


def cluster_to_join(address: str | None) -> str | None:
    """The Ray cluster `ray.init(address)` joins, or None where it starts a local one. As `ray.init`: `address`, else
    RAY_ADDRESS, else the cluster `ray start` last started on this node (a `ray up` head node's): without
    `--address` there, pdserve joined that cluster while treating it as its own, and its exit shut down Serve with
    every other application on it (found in review). ValueError for "auto" with no cluster to find."""
    address = _ray_address(address)
    if is_ray_client(address):
        return address
    from ray._private.services import canonicalize_bootstrap_address

    try:
        return canonicalize_bootstrap_address(address)  # type: ignore[arg-type]  # it takes None (its annotation not)
    except ConnectionError as e:
        raise ValueError(f"--address {address}: {e}") from None


def check_port_free(host: str, port: int) -> None:
    """ValueError naming the holder when this host cannot listen on `port`. A cluster pdserve starts would fail
    later with a traceback (Serve's proxy), or with direct ingress report serving while the port answered for
    another process: an HAProxy a killed cluster left behind (`ray stop --force` leaves it running) returned 500
    to every request."""
    try:  # the address a server binds for `host` (a name may resolve to IPv6 only)
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: {e.strerror or e}") from None
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and HAProxy bind: TIME_WAIT is no holder
        try:
            s.bind(address)
        except OSError as e:
            holder = _port_holder(str(address[0]), port)
            raise ValueError(
                f"cannot listen on {host}:{port} ({e.strerror or e}){holder}: stop it or choose another --port"
            ) from None


def _port_holder(ip: str, port: int) -> str:
    """The text ", held by pid N (name)" for a listener on `port` that takes `ip` (that address, or every
    address) this user may see, else empty."""
    try:
        import psutil

        for conn in psutil.net_connections("tcp"):
            if conn.status != psutil.CONN_LISTEN or not conn.laddr or conn.laddr.port != port or not conn.pid:
                continue
            if conn.laddr.ip in (ip, "0.0.0.0", "::") or ip in ("0.0.0.0", "::"):
                return f", held by pid {conn.pid} ({psutil.Process(conn.pid).name()})"
    except Exception:  # no psutil, no permission, a process gone meanwhile: the error stands without a name
        pass
    return ""


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _wait_until_running(name: str) -> None:
    """Until Serve's application `name` runs (no deadline: a model loads as long as it takes); RuntimeError if its
    deploy failed."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    while True:
        app = serve.status().applications.get(name)
        if app is not None and app.status == ApplicationStatus.RUNNING:
            return
        if app is not None and app.status == ApplicationStatus.DEPLOY_FAILED:
            raise RuntimeError(f"the application {name!r} failed to deploy: {app.message}")
        time.sleep(1.0)


def _flag_kind(option: Option) -> dict[str, Any]:
    """argparse's arguments for one option: how it parses and its help (the field's description and default)."""
    help_text = _escape(option.field.description or "")
    if option.field.default_factory is None and option.field.default not in (None, ...):
        help_text += f" (default: {_escape(str(option.field.default))})"
    help_text += f" [env {option.env}]" if option.kind != "keys" else f" [env {ENV_PREFIX}API_KEYS, comma-separated]"
    metavar = option.path[-1].upper()
    if option.kind == "switch":
        return {"action": argparse.BooleanOptionalAction, "help": help_text}
    if option.kind == "list":
        return {"nargs": "+", "metavar": metavar.removesuffix("S"), "help": help_text}
    if option.kind == "json":
        return {"type": json.loads, "metavar": "JSON", "help": help_text}
    if option.kind == "keys":
        return {"action": "append", "metavar": "KEY", "help": help_text}
    return {"choices": option.choices, "metavar": metavar if option.choices is None else None, "help": help_text}


def _from_flag(option: Option, value: Any) -> Any:
    """None for "none" (or "null") where the field takes None: a value, or a list given as that one word (so a flag
    or variable can clear a list the file set)."""
    word = value[0] if isinstance(value, list) and len(value) == 1 else value
    return None if option.allows_none and isinstance(word, str) and word.lower() in ("none", "null") else value


def _from_env(option: Option, value: str) -> Any:
    if option.kind == "json" or (option.kind == "list" and value.lstrip().startswith("[")):
        return json.loads(value)
    if option.kind == "list":
        return _from_flag(option, [item.strip() for item in value.split(",") if item.strip()])
    return _from_flag(option, value)


def _by_field_name(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with fields given by another accepted name (served_model_name) under the field's own, which the
    environment and flags then override."""
    data = dict(data)
    for name, field in ServeConfig.model_fields.items():
        if isinstance(field.validation_alias, AliasChoices):
            for alias in field.validation_alias.choices:
                if isinstance(alias, str) and alias != name and alias in data:
                    data[name] = data.pop(alias)
    return data


def _put(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for depth, key in enumerate(path[:-1], 1):
        data = data.setdefault(key, {})
        if not isinstance(data, dict):  # the file gave a value where the section's settings go
            raise ValueError(f"{'.'.join(path[:depth])} is a section of settings, not {data!r}")
    data[path[-1]] = value


def _describe(error: Any) -> str:
    """A validation error named by the flag that sets the field."""
    dest = ".".join(str(part) for part in error["loc"])
    flags = {option.dest: option.flags[0] for option in config_options()}
    return f"{flags.get(dest, dest)}: {error['msg']}" if dest else str(error["msg"])  # a check across fields


def _without_none(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _escape(text: str) -> str:
    return text.replace("%", "%%")


if __name__ == "__main__":
    main()
