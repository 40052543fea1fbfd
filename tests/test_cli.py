"""`pdserve serve`: flags generated from ServeConfig (every field once, with its description), the precedence of
flags over the environment over a `--config` file, hub ids resolved from a Hugging Face cache offline, GPU
placement and KV sizing by device, and (slow) the command serving a hub id end to end."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, get_args

import httpx
import psutil
import pytest
from pydantic import BaseModel

from pdserve.cli import (
    build_parser,
    check_joined_serve,
    check_port_free,
    cluster_to_join,
    is_ray_client,
    main,
    serve_config,
)
from pdserve.hub import resolve_model
from pdserve.serve.config import PoolConfig, ServeConfig
from pdserve.serve.process import QUIET_SERVE_ENV, quiet_serve_env

TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

COMMIT = "0123456789abcdef0123456789abcdef01234567"
NOT_FIELDS = {"help", "model_tag", "config", "api_keys_file", "address"}  # the command's own options


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def hub_cache(root: Path, repo_id: str, model_dir: Path, commit: str = COMMIT, ref: str = "main") -> Path:
    """A Hugging Face hub cache holding `model_dir` as `repo_id` at `commit`, laid out as huggingface_hub does:
    models--org--name/snapshots/<commit>/ and refs/<ref> naming the commit. Returns the snapshot directory."""
    storage = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HUB_CACHE holding `org/tiny`, HF_HUB_OFFLINE=1; returns the snapshot."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_cache(tmp_path / "hub", "org/tiny", tiny_llama)


def parse(argv: list[str], environ: dict[str, str] | None = None) -> ServeConfig:
    parser, _ = build_parser()
    return serve_config(parser.parse_args(["serve", *argv]), environ or {})


def field_paths(model: type[BaseModel] = ServeConfig, prefix: str = "") -> dict[str, Any]:
    """Every field of the config, nested models walked into: dotted path -> FieldInfo."""
    paths: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, types.UnionType):  # X | None
            annotation = next(t for t in get_args(annotation) if t is not type(None))
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths.update(field_paths(annotation, f"{prefix}{name}."))
        else:
            paths[prefix + name] = field
    return paths


# ---- flags from the config model ----


def test_help_lists_every_config_field_exactly_once_with_its_description() -> None:
    _, serve = build_parser()
    help_text = serve.format_help().split("\noptions:\n", 1)[1]  # the options, after the command's description
    flat = re.sub(r"\s+", "", help_text)
    actions = {a.dest: a for a in serve._actions}
    paths = field_paths()
    assert set(actions) - NOT_FIELDS == set(paths)  # one flag per field, no flag without a field
    assert {"prefill.num_replicas", "router.policy", "limits.max_tokens", "ingress.ray_actor_options"} <= set(paths)
    for path, field in paths.items():
        flag = actions[path].option_strings[0]
        assert len(re.findall(rf"(?<![\w.-]){re.escape(flag)}(?![\w.-])", help_text)) == 1, flag
        assert field.description, f"{path} has no description"
        assert re.sub(r"\s+", "", field.description)[:50] in flat, path


def test_vllm_names_and_the_older_spellings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("t.jinja").write_text(TEMPLATE)
    config = parse(
        ["--max-model-len", "128", "--max-num-seqs", "4", "--max-num-batched-tokens", "64",
         "--no-enable-prefix-caching", "--gpu-memory-utilization", "0.5", "--chat-template", "t.jinja",
         "--generation-config", "vllm",
         "--device", "cpu", "--served-model-name", "tiny", "alias", "--revision", "v1", "--kv-cache-memory-bytes",
         "2097152", "--num-prefill", "2", "--num-decode", "3", "--num-engines", "4", "--routing-policy", "pow2",
         "--local-prefill-max-tokens", "0", "--stream-interval", "4", "--colocated", "--api-key", "sk-0123456789",
         "--kv-transport", "shm", "--dtype", "float32", "--host", "0.0.0.0", "--port", "9000", "--niceness", "none",
         "--prefill.cpus", "0", "1", "--ingress.ray-actor-options", '{"num_cpus": 1}'],
    )  # fmt: skip
    assert (config.max_model_len, config.max_num_seqs, config.max_num_batched_tokens) == (128, 4, 64)
    assert config.enable_prefix_caching is False and config.gpu_memory_utilization == 0.5
    assert (config.chat_template, config.generation_config, config.device) == (TEMPLATE, "vllm", "cpu")
    assert config.served_model_names == ["tiny", "alias"] and config.served_model_name == "tiny"
    assert config.revision == "v1" and config.kv_cache_memory_bytes == 2 << 20
    assert (config.prefill.num_replicas, config.decode.num_replicas, config.engine.num_replicas) == (2, 3, 4)
    assert config.router.policy == "pow2" and config.router.local_prefill_max_tokens == 0
    assert config.stream_interval == 4 and config.colocated and len(config.api_keys) == 1
    assert (config.kv_transport, config.dtype, config.host, config.port) == ("shm", "float32", "0.0.0.0", 9000)
    assert config.niceness is None and config.prefill.cpus == [0, 1]
    assert config.ingress.ray_actor_options == {"num_cpus": 1}
    assert parse([]) == ServeConfig()  # nothing given: the defaults


def test_a_chat_template_path_that_cannot_be_read_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A value with no template characters names a file (vLLM's rule): a mistyped path was taken as the template
    itself, and every chat prompt became its text (found in review). Refused before anything starts; a file is read
    into the config (the ingress may run on another node); an inline template stays as given."""
    with pytest.raises(SystemExit):
        main(["serve", "--chat-template", str(tmp_path / "templates/chatml.jinja")])
    assert "looks like a file path, but it cannot be read" in capsys.readouterr().err
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    assert parse(["--chat-template", str(tmp_path / "t.jinja")]).chat_template == TEMPLATE
    assert ServeConfig(chat_template=TEMPLATE).chat_template == TEMPLATE
    assert ServeConfig.model_validate(ServeConfig(chat_template=TEMPLATE).model_dump()).chat_template == TEMPLATE


@pytest.mark.parametrize(
    ("files", "environ", "argv", "said"),
    [
        ({}, {}, ["--config", "{d}/nope.yaml"], "--config {d}/nope.yaml: No such file or directory"),
        ({"c.yaml": "prefill: [1"}, {}, ["--config", "{d}/c.yaml"], "--config {d}/c.yaml: not valid YAML"),
        ({}, {}, ["--api-keys-file", "{d}/nope"], "--api-keys-file {d}/nope: No such file or directory"),
        ({"k.yaml": "- {key: sk-012345678}\n- {key: short}"}, {}, ["--api-keys-file", "{d}/k.yaml"],
         "{d}/k.yaml: entry 1: Value error, an API key needs at least 8 characters"),
        ({"c.yaml": "prefill: 3"}, {"PDSERVE_PREFILL__NUM_REPLICAS": "2"}, ["--config", "{d}/c.yaml"],
         "PDSERVE_PREFILL__NUM_REPLICAS: prefill is a section of settings, not 3"),
        ({}, {"PDSERVE_PREFILL__RAY_ACTOR_OPTIONS": "{bad"}, [], "PDSERVE_PREFILL__RAY_ACTOR_OPTIONS: Expecting"),
        ({"c.yaml": "api_keys: sk-012345678"}, {}, ["--config", "{d}/c.yaml"], "api_keys is a list of keys, not str"),
        ({"k.pem": "k"}, {}, ["--ssl-certfile", "{d}/nope.pem", "--ssl-keyfile", "{d}/k.pem"],
         "ssl_certfile {d}/nope.pem: No such file or directory"),
        ({"c.pem": "c"}, {}, ["--ssl-certfile", "{d}/c.pem", "--ssl-keyfile", "{d}/nope.pem"],
         "ssl_keyfile {d}/nope.pem: No such file or directory"),
        ({"c.pem": "c", "k.pem": "k"}, {}, ["--ssl-certfile", "{d}/c.pem", "--ssl-keyfile", "{d}/k.pem"],
         "do not load as a certificate chain and its unencrypted private key"),
    ],
)  # fmt: skip
def test_a_file_or_variable_that_cannot_be_used_is_an_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    files: dict[str, str], environ: dict[str, str], argv: list[str], said: str,
) -> None:  # fmt: skip
    """Each was a Python traceback (found in review): a missing or malformed file, a value where a section goes, a
    variable that is not JSON. Now one line naming the flag, file (and entry) or variable; nothing starts."""
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("pdserve.cli.run_server", lambda *a: pytest.fail("the server started"))
    with pytest.raises(SystemExit):
        main(["serve", *(a.format(d=tmp_path) for a in argv)])
    err = capsys.readouterr().err
    assert said.format(d=tmp_path) in err and "Traceback" not in err and "sk-012345678" not in err


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_files_are_checked_before_anything_starts(tmp_path: Path) -> None:
    """Serve's proxy reads them only as it starts: a missing or mismatched file left `pdserve serve` waiting for
    ever for a proxy that kept failing (found in review). A key and its certificate pass; another's key does not,
    nor an encrypted key (OpenSSL would prompt for its password on the terminal)."""
    for name in ("a", "b"):
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / f"{name}.key"),
             "-out", str(tmp_path / f"{name}.pem"), "-days", "1", "-subj", "/CN=localhost"],
            check=True, capture_output=True,
        )  # fmt: skip
    ServeConfig(ssl_certfile=str(tmp_path / "a.pem"), ssl_keyfile=str(tmp_path / "a.key")).check_tls_files()
    mismatched = ServeConfig(ssl_certfile=str(tmp_path / "a.pem"), ssl_keyfile=str(tmp_path / "b.key"))
    with pytest.raises(ValueError, match="do not load as a certificate chain"):
        mismatched.check_tls_files()
    subprocess.run(
        ["openssl", "pkey", "-in", str(tmp_path / "a.key"), "-out", str(tmp_path / "locked.key"), "-aes256",
         "-passout", "pass:secret"],
        check=True, capture_output=True,
    )  # fmt: skip
    locked = ServeConfig(ssl_certfile=str(tmp_path / "a.pem"), ssl_keyfile=str(tmp_path / "locked.key"))
    with pytest.raises(ValueError, match="unencrypted private key"):
        locked.check_tls_files()
    ServeConfig().check_tls_files()  # no TLS: nothing to check


def test_an_empty_api_keys_entry_in_the_file_is_no_keys(tmp_path: Path) -> None:
    """`api_keys:` with nothing after it was a TypeError's traceback (found in review)."""
    path = tmp_path / "c.yaml"
    path.write_text("api_keys:\nport: 9000\n")
    config = parse(["--config", str(path), "--api-key", "sk-0123456789"])
    assert config.port == 9000 and len(config.api_keys) == 1


def test_none_clears_a_list_that_the_file_set(tmp_path: Path) -> None:
    """`--metrics-tenants none` was the tenant named "none" (found in review): a list could not be cleared."""
    path = tmp_path / "serve.yaml"
    path.write_text("api_keys: [{key: sk-0123456789, tenant: a}]\nmetrics_tenants: [a]\n")
    assert parse(["--config", str(path)]).metrics_tenants == ["a"]
    assert parse(["--config", str(path), "--metrics-tenants", "none"]).metrics_tenants is None
    assert parse(["--config", str(path)], {"PDSERVE_METRICS_TENANTS": "none"}).metrics_tenants is None
    assert parse(["--prefill.cpus", "0", "1"]).prefill.cpus == [0, 1]


def test_a_misspelled_variable_is_named_with_the_closest_setting(caplog: pytest.LogCaptureFixture) -> None:
    """PDSERVE_SERVED_MODEL_NAME (the flag's spelling; the field is served_model_names) changed nothing silently."""
    environ = {"PDSERVE_SERVED_MODEL_NAME": "mine", "PDSERVE_MAX_NUM_SEQS": "8", "PDSERVE_FAULTS": "",
               "PDSERVE_TRACES_FILE": "s.jsonl", "PDSERVE_API_KEYS": "", "UNRELATED": "1"}  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="pdserve.cli"):
        config = parse([], environ)
    assert config.max_num_seqs == 8 and config.served_model_names != ["mine"]
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [
        "PDSERVE_SERVED_MODEL_NAME is not a pdserve setting and is ignored (did you mean PDSERVE_SERVED_MODEL_NAMES?)"
    ]


def test_flags_override_the_environment_which_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(
        "model: from-file\nserved_model_name: file-name\nmax_num_seqs: 8\nblock_size: 32\nmax_num_batched_tokens: 128\n"
        "prefill: {num_replicas: 3, ray_actor_options: {num_cpus: 2}}\n"
        "api_keys: [{key: sk-from-file-1234}]\n"
    )
    environ = {"PDSERVE_MAX_NUM_SEQS": "16", "PDSERVE_BLOCK_SIZE": "64", "PDSERVE_PREFILL__CPUS": "0,1",
               "PDSERVE_COLOCATED": "true", "PDSERVE_API_KEYS": "sk-from-env-1234", "PDSERVE_TRACING_ENV": '{"A": "b"}',
               "PDSERVE_SERVED_MODEL_NAMES": "env-name,env-alias", "UNRELATED": "1"}  # fmt: skip
    config = parse(["org/tiny", "--config", str(path), "--max-num-seqs", "32", "--prefill.num-replicas", "5",
                    "--api-key", "sk-from-flag-1234", "--no-colocated"], environ)  # fmt: skip
    assert config.model == "org/tiny"  # flag (the positional) > file
    assert config.max_num_seqs == 32  # flag > env > file
    assert config.block_size == 64  # env > file
    assert config.max_num_batched_tokens == 128  # file > default
    assert config.prefill == PoolConfig(num_replicas=5, ray_actor_options={"num_cpus": 2}, cpus=[0, 1])
    assert config.colocated is False and config.tracing_env == {"A": "b"}
    assert config.served_model_names == ["env-name", "env-alias"]  # env > file, whatever spelling the file used
    assert len(config.api_keys) == 3  # keys add up from every source
    assert parse(["--config", str(path)]).served_model_names == ["file-name"]


def test_bad_values_are_named_by_their_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from pdserve.cli import main

    for argv, said in ((["--max-num-seqs", "0"], "--max-num-seqs"), (["--prefill.num-replicas", "x"], "--prefill."),
                       (["a", "--model", "b"], "two models"), (["--device", "tpu"], "invalid choice")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", *argv])
        assert exit_info.value.code == 2 and said in capsys.readouterr().err


def test_configs_that_serve_would_refuse_fail_at_validation() -> None:
    """Refused when the config is read, before any model download or Ray start (each used to pass, then fail in
    `build_app`, a replica's start or `run_server`): a pool of 0 replicas that no planner sizes, a negative core,
    half a TLS pair."""
    from pydantic import ValidationError

    for fields, said in (
        ({"prefill": {"num_replicas": 0}}, "prefill.num_replicas"),
        ({"decode": {"num_replicas": 0}}, "decode.num_replicas"),
        ({"colocated": True, "engine": {"num_replicas": 0}}, "engine.num_replicas"),
        ({"ingress": {"num_replicas": 0}}, "ingress.num_replicas"),
        ({"decode": {"cpus": [0, -1]}}, "greater than or equal to 0"),
        ({"ssl_keyfile": "key.pem"}, "both ssl_keyfile and ssl_certfile"),
        ({"ingress": {"num_threads": 4}}, "the ingress runs none"),
    ):
        with pytest.raises(ValidationError, match=re.escape(said)):
            ServeConfig(**fields)
    ServeConfig(colocated=True, prefill={"num_replicas": 0})  # a pool this mode does not use
    ServeConfig(  # the planner sizes these pools: they may start at their minimum, 0
        autoscaling={"enabled": True}, prefill={"num_replicas": 0, "min_replicas": 0}, decode={"num_replicas": 1}
    )


def test_pinning_to_cores_this_process_cannot_use_is_an_error() -> None:
    """Cores this node lacks (or outside its cpuset): pinning failed silently, and the replica ran anywhere."""
    from pdserve.serve.process import pin_process

    before = os.sched_getaffinity(0)
    with pytest.raises(ValueError, match="cannot pin to cores"):
        pin_process([4096])
    assert os.sched_getaffinity(0) == before


def test_serve_waits_for_a_slow_deploy_and_reports_a_failed_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The autoscaled path polls the application's status with no deadline (Ray's blocking deploy gave up after
    60 s, shorter than a large model's load), and a failed deploy is an error naming Serve's message."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    from pdserve import cli

    answers = iter([None, ApplicationStatus.DEPLOYING, ApplicationStatus.DEPLOYING, ApplicationStatus.RUNNING])
    polls: list[object] = []

    def status() -> object:
        polls.append(state := next(answers))
        apps = {} if state is None else {"pdserve": types.SimpleNamespace(status=state, message="boom")}
        return types.SimpleNamespace(applications=apps)

    monkeypatch.setattr(serve, "status", status)
    monkeypatch.setattr(cli.time, "sleep", lambda _s: None)
    cli._wait_until_running("pdserve")
    assert polls[-1] == ApplicationStatus.RUNNING and len(polls) == 4
    answers = iter([ApplicationStatus.DEPLOYING, ApplicationStatus.DEPLOY_FAILED])
    with pytest.raises(RuntimeError, match="failed to deploy: boom"):
        cli._wait_until_running("pdserve")


@pytest.mark.parametrize("cluster", ["started", "--address", "ray start", "--address, Serve not running"])
def test_settings_this_cluster_cannot_serve_are_an_error_and_what_was_set_up_goes(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], cluster: str
) -> None:
    """`--kv-transport nccl` on a cluster without GPUs validates alone and fails when the app is built, after Ray and
    Serve started: that was a traceback, with Serve left up on a joined cluster (found in review). Now one error
    line, Serve shut down (or, on a joined cluster, nothing of its deleted: pdserve was never deployed there). A
    cluster joined without --address (`ray start` on this node, as on a `ray up` head) is joined too: Serve, with
    every other application on it, was shut down."""
    import ray
    from ray import serve
    from ray.serve import context

    from serving import free_port

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # where `ray start` records this node's cluster
    if cluster == "ray start":
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text("10.0.0.1:6379")
    joined = cluster != "started"
    port = free_port()
    http = types.SimpleNamespace(host="127.0.0.1", port=port, ssl_keyfile=None, ssl_certfile=None)
    client = None if cluster.endswith("not running") else types.SimpleNamespace(http_config=http)
    monkeypatch.setattr(context, "_get_global_client", lambda **kw: client)
    monkeypatch.setattr(serve, "status", lambda: types.SimpleNamespace(applications={}))
    calls: list[str] = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append("ray.init"))
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("ray.shutdown"))
    monkeypatch.setattr(serve, "start", lambda **kw: calls.append("serve.start"))
    monkeypatch.setattr(serve, "shutdown", lambda: calls.append("serve.shutdown"))
    monkeypatch.setattr(serve, "delete", lambda name: calls.append(f"serve.delete {name}"))
    monkeypatch.setattr(serve, "run", lambda *a, **kw: pytest.fail("deployed"))
    with pytest.raises(SystemExit):
        address = ["--address", "10.0.0.1:6379"] if cluster.startswith("--address") else []
        main(["serve", str(tiny_llama), "--kv-transport", "nccl", "--port", str(port), *address])
    err = capsys.readouterr().err
    assert "invalid settings for this cluster:" in err and "Traceback" not in err
    # Serve goes where this call started it: with the cluster it started, or on a joined one with no app left
    shut_down = not joined or client is None
    assert calls == ["ray.init", "serve.start", *(["serve.shutdown"] if shut_down else []), "ray.shutdown"]


def test_an_autoscaled_deploy_stores_the_exporters_headers_for_the_cluster(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With autoscaling the app is built on the cluster from a deploy config, in a process without the command's
    environment: `pdserve serve --address ...` stored no OTLP headers, and a joined cluster's replicas exported
    without the collector's credentials (found in review). They are stored before the deploy."""
    import ray
    from ray import serve
    from ray.serve import context
    from ray.serve.schema import ApplicationStatus

    from pdserve.serve import cluster_store

    calls: list[str] = []
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer abc")
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append("ray.init"))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("ray.shutdown"))
    monkeypatch.setattr(serve, "start", lambda **kw: calls.append("serve.start"))
    monkeypatch.setattr(serve, "delete", lambda name: calls.append(f"serve.delete {name}"))
    running = types.SimpleNamespace(status=ApplicationStatus.RUNNING, message="")
    monkeypatch.setattr(serve, "status", lambda: types.SimpleNamespace(applications={"pdserve": running}))
    client = types.SimpleNamespace(deploy_apps=lambda schema: calls.append("deploy_apps"))
    monkeypatch.setattr(context, "_get_global_client", lambda: client)
    stored: list[dict[str, str]] = []
    monkeypatch.setattr(
        cluster_store,
        "publish_tracing_secrets",
        lambda carried: stored.append(dict(os.environ)) or calls.append("publish"),
    )
    monkeypatch.setattr("pdserve.cli.threading.Event.wait", lambda self: None)  # served: stop at once
    monkeypatch.setattr("pdserve.cli.check_joined_serve", lambda config: False)  # Serve runs there, as asked
    main(["serve", str(tiny_llama), "--address", "10.0.0.1:6379", "--autoscaling.enabled",
          "--prefill.num-replicas", "1", "--decode.num-replicas", "1"])  # fmt: skip
    assert calls == ["ray.init", "serve.start", "publish", "deploy_apps", "serve.delete pdserve", "ray.shutdown"]
    assert stored[0]["OTEL_EXPORTER_OTLP_HEADERS"] == "authorization=Bearer abc"


# ---- models from the Hugging Face cache ----


def test_a_hub_id_resolves_to_its_snapshot_in_the_offline_cache(offline_hub: Path, tmp_path: Path) -> None:
    assert resolve_model("org/tiny") == offline_hub
    assert resolve_model("org/tiny", revision=COMMIT) == offline_hub
    assert ServeConfig(model="org/tiny").resolve_model_path() == str(offline_hub)
    # a replica on a node without the driver's path resolves the id again there
    assert ServeConfig(model="org/tiny").model_dir("/nonexistent/model") == str(offline_hub)
    assert ServeConfig(model="org/tiny").model_dir(str(offline_hub)) == str(offline_hub)


def test_hf_home_and_download_dir_are_honoured(
    tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    in_home = hub_cache(tmp_path / "home" / "hub", "org/tiny", tiny_llama)
    elsewhere = hub_cache(tmp_path / "elsewhere", "org/tiny", tiny_llama, commit="f" * 40)
    assert resolve_model("org/tiny") == in_home
    assert resolve_model("org/tiny", cache_dir=tmp_path / "elsewhere") == elsewhere
    assert parse(["org/tiny", "--download-dir", str(tmp_path / "elsewhere")]).resolve_model_path() == str(elsewhere)


def test_an_absent_hub_id_names_the_id_the_revision_and_the_cache(offline_hub: Path) -> None:
    cache = str(offline_hub.parents[2])
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE") as error:
        resolve_model("org/absent")
    assert "'org/absent'" in str(error.value) and "revision main" in str(error.value) and cache in str(error.value)
    with pytest.raises(ValueError, match="revision v2"):
        resolve_model("org/tiny", revision="v2")
    with pytest.raises(ValueError, match="not a local directory, nor a Hugging Face hub id"):
        resolve_model("./no/such//dir")


def test_the_command_reports_an_absent_model_before_starting_ray(
    offline_hub: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pdserve.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "org/absent"])
    assert "'org/absent'" in capsys.readouterr().err


# ---- device: placement and KV sizing ----


def test_auto_device_follows_the_cluster_gpus() -> None:
    assert ServeConfig().device == "auto"
    assert ServeConfig().with_device(num_gpus=2).device == "cuda"
    assert ServeConfig().with_device(num_gpus=0).device == "cpu"
    assert ServeConfig(kv_transport="gloo").with_device(num_gpus=2).device == "cpu"  # a host transport: host KV
    assert ServeConfig(device="cpu").with_device(num_gpus=2).device == "cpu"  # explicit stays
    with pytest.raises(ValueError, match="cannot move KV on cpu"):
        ServeConfig(kv_transport="nccl").with_device(num_gpus=0)


def _built(config: ServeConfig, model: Path) -> dict[str, Any]:
    """The deployments build_app makes, by name, as Serve would deploy them (nothing runs)."""
    from ray.serve._private.build_app import build_app as serve_build

    from pdserve.serve.app import build_app

    built = serve_build(build_app(config, str(model)), name="t", make_deployment_handle=lambda *_: None)
    return {d.name: d for d in built.deployments}


def test_on_cuda_every_engine_replica_takes_a_gpu_of_its_own(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pdserve.serve.app as app

    monkeypatch.setattr(app, "cluster_gpus", lambda: 4.0)  # a cluster with GPUs: auto means cuda
    disaggregated = _built(ServeConfig(model=str(tiny_llama), prefill=PoolConfig(num_replicas=2)), tiny_llama)
    assert set(disaggregated) == {"PrefillServer", "DecodeServer", "Ingress"}  # prefill and decode: two pools
    assert disaggregated["PrefillServer"].ray_actor_options == {"num_cpus": 0, "num_gpus": 1}
    assert disaggregated["PrefillServer"].num_replicas == 2
    assert disaggregated["DecodeServer"].ray_actor_options == {"num_cpus": 0, "num_gpus": 1}
    assert disaggregated["Ingress"].ray_actor_options == {"num_cpus": 0}
    assert disaggregated["DecodeServer"].init_args[0].device == "cuda"  # replicas get the resolved device
    shared = PoolConfig(ray_actor_options={"num_gpus": 0.5})  # a pool that says how many GPUs keeps it
    colocated = _built(ServeConfig(model=str(tiny_llama), device="cuda", colocated=True, engine=shared), tiny_llama)
    assert set(colocated) == {"EngineServer", "Ingress"}
    assert colocated["EngineServer"].ray_actor_options["num_gpus"] == 0.5
    monkeypatch.setattr(app, "cluster_gpus", lambda: 0.0)
    on_cpu = _built(ServeConfig(model=str(tiny_llama)), tiny_llama)
    assert on_cpu["DecodeServer"].ray_actor_options == {"num_cpus": 0}
    assert on_cpu["DecodeServer"].init_args[0].device == "cpu"


def test_the_kv_cache_is_what_gpu_memory_utilization_leaves(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from safetensors.torch import load_file

    from pdserve.engine.memory import checkpoint_elements, plan_gpu_memory

    elements = sum(t.numel() for f in tiny_llama.glob("*.safetensors") for t in load_file(f).values())
    assert checkpoint_elements(str(tiny_llama)) == elements
    gib = 1 << 30
    plan = plan_gpu_memory(
        str(tiny_llama), "bfloat16", 0.5, 64, 4, None, 1 << 20, free_and_total_bytes=(8 * gib, 8 * gib)
    )
    assert plan.budget_bytes == 4 * gib and plan.weight_bytes == 2 * elements
    assert plan.kv_cache_bytes == 4 * gib - plan.weight_bytes - plan.activation_bytes - (1 << 20)
    crowded = plan_gpu_memory(str(tiny_llama), "float32", 0.9, 64, 4, None, 0, free_and_total_bytes=(gib, 8 * gib))
    assert crowded.budget_bytes == gib and crowded.weight_bytes == 4 * elements  # never more than is free
    with pytest.raises(ValueError, match="no GPU memory left for the KV cache"):
        plan_gpu_memory(str(tiny_llama), "float32", 0.9, 64, 4, None, 0, free_and_total_bytes=(1 << 20, 8 * gib))
    # the replica's engine config: sized from the GPU on cuda, 1 GiB on cpu, as given when given
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *_: (8 * gib, 8 * gib))
    on_gpu = ServeConfig(device="cuda", gpu_memory_utilization=0.5, max_num_batched_tokens=64, max_num_seqs=4)
    expected = plan_gpu_memory(
        str(tiny_llama),
        "auto",
        0.5,
        64,
        4,
        None,
        (512 << 20) + 8 * (100 << 20),
        free_and_total_bytes=(8 * gib, 8 * gib),
    )
    assert on_gpu.engine_config(str(tiny_llama)).cache.memory_bytes == expected.kv_cache_bytes
    assert ServeConfig(device="cpu").engine_config(str(tiny_llama)).cache.memory_bytes == gib
    assert (
        ServeConfig(device="cuda", kv_cache_memory_bytes=1 << 25).engine_config(str(tiny_llama)).cache.memory_bytes
        == 1 << 25
    )
    with pytest.raises(ValueError, match="resolve device 'auto' first"):
        ServeConfig().engine_config(str(tiny_llama))


@pytest.mark.parametrize(("prefill_timeout_s", "kv_transfer_timeout_s"), [(60.0, 30.0), (120.0, 90.0), (5.0, 5.0)])
def test_a_prefill_result_outlives_any_push_that_may_still_read_it(
    tiny_llama: Path, prefill_timeout_s: float, kv_transfer_timeout_s: float
) -> None:
    """The prefill replica's reaper frees a result nobody released after `held_ttl_s`: fixed at 60 s, a push
    started late in its call (`prefill_timeout_s`) and running up to `kv_transfer_timeout_s` could still be reading
    the blocks then — handed to the next prompt, whose KV it would send under the right epoch (found in review)."""
    config = ServeConfig(device="cpu", prefill_timeout_s=prefill_timeout_s, kv_transfer_timeout_s=kv_transfer_timeout_s)
    held_ttl_s = config.engine_config(str(tiny_llama)).cache.held_ttl_s
    assert held_ttl_s >= 60.0 and held_ttl_s > prefill_timeout_s + kv_transfer_timeout_s


# ---- the command itself (slow: starts a Ray cluster) ----


@pytest.mark.slow
def test_pdserve_serve_a_hub_id_answers_completions(offline_hub: Path, tmp_path: Path) -> None:
    from serving import Served, free_port

    port, log = free_port(), tmp_path / "serve.log"
    # `--address local`: a cluster of its own even where `ray start` runs one (without it, it would join that)
    command = [sys.executable, "-m", "pdserve.cli", "serve", "org/tiny", "--device", "cpu", "--port", str(port),
               "--dtype", "float32", "--num-kv-blocks", "64", "--served-model-name", "tiny", "tiny-alias",
               "--address", "local"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in QUIET_SERVE_ENV and k != "RAY_ADDRESS"}
    # Ray 2.60's direct ingress, as docs/DEPLOY.md advises for speed: HAProxy forwards to the ingress replicas
    env |= {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
    env["PDSERVE_FAULTS"] = "engine.step=slow:0.03"  # a long stream lasts long enough to be left mid-way
    with open(log, "w") as out:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    stopped = False
    try:
        _wait_for_line(log, "pdserve is serving on", server, deadline_s=300)
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0}
        response = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["model"] == "tiny" and answer["usage"]["completion_tokens"] >= 1
        # A client leaving mid-stream, through HAProxy: its request ends on every replica and frees its blocks
        served = Served(f"http://127.0.0.1:{port}/v1", num_engine_replicas=2)
        long = {"model": "tiny", "prompt": "hello", "max_tokens": 900, "ignore_eos": True, "stream": True}  # 27 s
        with httpx.stream("POST", f"{served.base_url}/completions", json=long, timeout=60) as stream:
            assert stream.status_code == 200
            assert next(line for line in stream.iter_lines() if line.startswith("data: {"))
        assert served.wait_blocks_used(0.0) == 0.0
        assert served.settled_total("pdserve_num_requests_running") == 0.0
        # the cluster it started runs Serve's controller and replicas with the quieter periodic work
        serve_processes = [
            p for p in psutil.process_iter(["cmdline"]) if "ray::Serve" in " ".join(p.info["cmdline"] or [])
        ]
        assert {" ".join(p.info["cmdline"]).split(".")[0].strip() for p in serve_processes} >= {
            "ray::ServeController",
            "ray::ServeReplica:pdserve:Ingress",
        }
        for process in serve_processes:
            assert {k: process.environ().get(k) for k in QUIET_SERVE_ENV} == QUIET_SERVE_ENV, process.info["cmdline"]
        # SIGTERM (as Ctrl-C) ends it in seconds, HAProxy included: the ingress's drain for external load balancers
        # (Serve's 30 s) made the controller's shutdown give up after 30 s
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, log.read_text()[-4000:]
        stopped = True
        assert time.monotonic() - started < 27.0  # ~9 s; 31 s and more with Serve's 30 s drain
        check_port_free("127.0.0.1", port)  # nothing of the cluster still listens there
    finally:
        if not stopped:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def test_pdserve_serve_refuses_a_port_another_process_listens_on(tiny_llama: Path) -> None:
    """Before any Ray work, one line naming the holder: Serve's proxy failed later with a traceback, and with direct
    ingress the command said it was serving while an HAProxy left by a killed cluster answered 500 on the port."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ValueError, match=rf"cannot listen on 127.0.0.1:{port} .*held by pid {os.getpid()} "):
            check_port_free("127.0.0.1", port)
        command = [
            sys.executable,
            "-m",
            "pdserve.cli",
            "serve",
            str(tiny_llama),
            "--port",
            str(port),
            "--address",
            "local",
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in result.stderr, result.stderr
    assert "Ray" not in result.stderr  # refused before a cluster started
    check_port_free("127.0.0.1", port)  # closed: free again


def test_pdserve_serve_joins_the_cluster_ray_init_would(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --address, `ray.init` joins the cluster `ray start` runs on this node (a `ray up` head node's) or
    RAY_ADDRESS: pdserve treated it as a cluster of its own and its exit shut Serve down there, every other
    application with it. Which one it joins decides what its exit may remove."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # where `ray start` records the node's cluster
    assert cluster_to_join(None) is None  # none here: it starts one (and shuts it down at exit)
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.1.2.3:6379")
    assert cluster_to_join(None) == "10.1.2.3:6379"
    assert cluster_to_join("local") is None  # Ray's word for a new local cluster
    monkeypatch.setenv("RAY_ADDRESS", "10.9.9.9:6379")
    assert cluster_to_join(None) == "10.9.9.9:6379"
    assert cluster_to_join("10.4.4.4:6379") == "10.4.4.4:6379"
    assert cluster_to_join("ray://head:10001") == "ray://head:10001"
    assert not is_ray_client(None) and not is_ray_client("10.4.4.4:6379")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # Ray Client from the environment, as ray.init reads it
    assert cluster_to_join(None) == "ray://head:10001" and is_ray_client(None) and is_ray_client("auto")


@pytest.mark.slow
@pytest.mark.serve_cluster
def test_a_joined_clusters_serve_is_checked_before_anything_is_deployed() -> None:
    """On a joined cluster whose Serve already runs: its HTTP options are the ones it started with (a new --port or
    TLS was ignored while the command printed the URL it asked for), and an application named pdserve there is
    someone's (`serve deploy deploy/cpu-1p1d.yaml`): deploying replaced it and the exit deleted it (found in
    review). Both are refused before any deploy."""
    from ray import serve

    from serving import shared_serve

    with shared_serve() as port:
        assert check_joined_serve(ServeConfig(port=port)) is False  # Serve runs there, listening where asked
        with pytest.raises(ValueError, match=rf"already listens on http://127.0.0.1:{port} .*port={port + 1}\)"):
            check_joined_serve(ServeConfig(port=port + 1))
        with pytest.raises(ValueError, match=r"--host 127.0.0.1 .*host=0.0.0.0\)"):
            check_joined_serve(ServeConfig(host="0.0.0.0", port=port))

        @serve.deployment(ray_actor_options={"num_cpus": 0})
        def theirs(request: object) -> str:
            return "theirs"

        serve.run(theirs.bind(), name="pdserve", route_prefix="/theirs")
        with pytest.raises(ValueError, match="already runs an application named pdserve"):
            check_joined_serve(ServeConfig(port=port))
        assert "pdserve" in serve.status().applications  # nothing of it touched


def test_quiet_serve_env_leaves_a_value_already_set() -> None:
    environ = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1"}
    quiet_serve_env(environ)
    assert environ == {**QUIET_SERVE_ENV, "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1"}


def _wait_for_line(log: Path, line: str, server: subprocess.Popen[bytes], deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while line not in log.read_text(errors="replace"):
        if server.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"pdserve serve did not start (exit {server.poll()}):\n{log.read_text()[-4000:]}")
        time.sleep(1)


def test_scheduling_policy_reaches_the_engines_scheduler(tiny_llama: Path) -> None:
    config = parse(["--scheduling-policy", "shortest_prefill_first", "--prefill-aging-tokens-per-s", "8"])
    scheduler = config.model_copy(update={"device": "cpu"}).engine_config(str(tiny_llama)).scheduler
    assert (scheduler.policy, scheduler.prefill_aging_tokens_per_s) == ("shortest_prefill_first", 8.0)
    assert ServeConfig(device="cpu").engine_config(str(tiny_llama)).scheduler.policy == "fcfs"
    with pytest.raises(SystemExit):
        parse(["--scheduling-policy", "priority"])  # not a policy pdserve has: argparse's choices refuse it


def test_the_smollm2_conversion_is_kept_across_installs_of_the_same_gguf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its marker named the GGUF's mtime, which pip sets at install: two installs sharing the cache (two venvs, an
    image rebuilt over a cache volume) each rebuilt the other's conversion, deleting it under its readers (found in
    review). Now the same GGUF content keeps it whatever its mtime; another GGUF rebuilds it."""
    from pdserve import hub

    gguf = tmp_path / "pkg" / hub.SMOLLM2_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(bytes(range(256)) * 9000)  # past the 1 MiB hashed at each end
    built: list[str] = []

    def convert(source: Path, dtype: str, out: Path) -> None:
        built.append(dtype)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(hub, "find_smollm2_gguf", lambda: gguf)
    monkeypatch.setattr(hub, "_convert", convert)
    cache = tmp_path / "cache"
    first = hub.materialize_smollm2("float32", cache_dir=cache)
    os.utime(gguf, ns=(1, 1))  # another install of the same file
    assert hub.materialize_smollm2("float32", cache_dir=cache) == first and built == ["float32"]
    data = bytearray(gguf.read_bytes())
    data[-1] ^= 1  # another GGUF of the same size
    gguf.write_bytes(bytes(data))
    hub.materialize_smollm2("float32", cache_dir=cache)
    assert built == ["float32", "float32"]


def test_the_hub_id_of_smollm2_is_the_hubs_checkpoint_and_the_packaged_one_has_no_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HuggingFaceTB/SmolLM2-135M-Instruct was taken for the packaged GGUF (dequantized Q4_1), its revision and
    download dir ignored (found in review): a user asking for the hub's weights got others, silently."""
    from pdserve import hub

    monkeypatch.setattr(hub, "materialize_smollm2", lambda *a: pytest.fail("took the packaged GGUF"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HuggingFaceTB/SmolLM2-135M-Instruct"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", revision="v2", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="has no revisions"):
        resolve_model("SmolLM2-135M-Instruct", revision="v2")


def test_a_transfer_deadline_receivers_refuse_is_refused_in_the_config() -> None:
    """900 s validated, and then every TCP, gloo and NCCL transfer failed: receivers accept at most MAX_PEER_SECONDS
    (found in review)."""
    from pydantic import ValidationError

    from pdserve.transfer.wire import MAX_PEER_SECONDS

    assert ServeConfig(kv_transfer_timeout_s=MAX_PEER_SECONDS).kv_transfer_timeout_s == MAX_PEER_SECONDS
    with pytest.raises(ValidationError, match="kv_transfer_timeout_s"):
        ServeConfig(kv_transfer_timeout_s=MAX_PEER_SECONDS + 1)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_sigterm_while_deploying_takes_the_app_down_on_a_joined_cluster(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, stop: signal.Signals
) -> None:
    """The SIGTERM handler was set only once serving: a SIGTERM during a deploy (minutes while a model loads)
    killed the process without its cleanup, leaving the app and its devices on a joined cluster (found in review).
    It now ends the command as Ctrl-C does, and the handler before it is back afterwards. So does SIGHUP: an SSH
    session to a `ray up` head closing killed it without cleanup, the app keeping its replicas (found in review)."""
    import ray
    from ray import serve

    from pdserve.serve import app as serve_app

    calls: list[str] = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append("ray.init"))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("ray.shutdown"))
    monkeypatch.setattr(serve, "start", lambda **kw: calls.append("serve.start"))
    monkeypatch.setattr(serve, "delete", lambda name: calls.append(f"serve.delete {name}"))
    monkeypatch.setattr(serve_app, "build_app", lambda config, model_path=None: "app")
    monkeypatch.setattr("pdserve.cli.check_joined_serve", lambda config: False)  # Serve runs there, as asked

    def deploying(app: object, **kwargs: object) -> None:
        calls.append("serve.run")
        os.kill(os.getpid(), stop)
        time.sleep(10)  # the model loads: the signal interrupts it
        calls.append("deployed")

    monkeypatch.setattr(serve, "run", deploying)
    before = signal.getsignal(stop)
    main(["serve", str(tiny_llama), "--address", "10.0.0.1:6379"])
    assert calls == ["ray.init", "serve.start", "serve.run", "serve.delete pdserve", "ray.shutdown"]
    assert signal.getsignal(stop) is before


def test_local_paths_reach_the_replicas_absolute(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray starts replicas in the raylet's working directory: on a cluster `ray start` began (a `ray up` head's,
    which `pdserve serve` now joins) that is not the command's, and a relative model directory was taken there for a
    hub id (found in review). The command hands the replicas absolute paths."""
    from pdserve import cli

    shutil.copytree(tiny_llama, tmp_path / "models" / "tiny")
    (tmp_path / "defaults").mkdir()
    monkeypatch.chdir(tmp_path)
    seen: dict[str, Any] = {}
    monkeypatch.setattr(cli, "run_server", lambda config, _, model_path: seen.update(config=config, path=model_path))
    main(["serve", "models/tiny", "--download-dir", "~/hf", "--generation-config", "defaults"])
    config = seen["config"]
    assert seen["path"] == config.model == str(tmp_path / "models" / "tiny")
    assert config.download_dir == str(Path.home() / "hf")
    assert config.generation_config == str(tmp_path / "defaults")
    traced = ServeConfig(tracing_env={"PDSERVE_TRACES_FILE": "spans.jsonl", "OTEL_SERVICE_NAME": "x"})
    assert traced.with_absolute_paths().tracing_env == {
        "PDSERVE_TRACES_FILE": str(tmp_path / "spans.jsonl"),
        "OTEL_SERVICE_NAME": "x",
    }
    tls = ServeConfig(ssl_keyfile="key.pem", ssl_certfile="cert.pem", generation_config="vllm").with_absolute_paths()
    assert (tls.ssl_keyfile, tls.ssl_certfile) == (str(tmp_path / "key.pem"), str(tmp_path / "cert.pem"))
    assert tls.generation_config == "vllm" and tls.model is None  # words, and the packaged default, stay as they are
    assert parse(["org/not-here"]).with_absolute_paths().model == "org/not-here"  # a hub id is no path
    (tmp_path / "SmolLM2-135M-Instruct").mkdir()  # the packaged model's name wins over a directory, as resolve_model
    assert parse(["SmolLM2-135M-Instruct"]).with_absolute_paths().model == "SmolLM2-135M-Instruct"
    # over Ray Client the paths are the cluster's: left as given
    main(["serve", "models/tiny", "--download-dir", "hf", "--address", "ray://head:10001"])
    assert (seen["config"].model, seen["config"].download_dir) == ("models/tiny", "hf")


def test_a_joined_serve_with_the_same_tls_files_however_spelled_is_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serve started with `ssl_keyfile: key.pem` (relative, or `~/...`) and this call's absolute paths name one file:
    comparing the strings refused it, and passing "its TLS files" as the error said could never match (review)."""
    from ray import serve
    from ray.serve import context

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    http = types.SimpleNamespace(host="127.0.0.1", port=8000, ssl_keyfile="key.pem", ssl_certfile="~/cert.pem")
    monkeypatch.setattr(context, "_get_global_client", lambda **kw: types.SimpleNamespace(http_config=http))
    monkeypatch.setattr(serve, "status", lambda: types.SimpleNamespace(applications={}))
    same = ServeConfig(ssl_keyfile="key.pem", ssl_certfile="cert.pem").with_absolute_paths()
    assert check_joined_serve(same) is False
    with pytest.raises(ValueError, match=r"already listens on https://127.0.0.1:8000 .*ssl_certfile=.*other.pem\)"):
        check_joined_serve(ServeConfig(ssl_keyfile="key.pem", ssl_certfile="other.pem").with_absolute_paths())


def test_nohup_keeps_serving_when_the_terminal_closes(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGHUP ends the command as Ctrl-C, unless it was ignored when the command started (`nohup pdserve serve &`):
    then it stays ignored, and the server outlives the SSH session (review)."""
    import ray
    from ray import serve

    from pdserve.serve import app as serve_app

    handlers: list[object] = []
    monkeypatch.setattr(ray, "init", lambda **kw: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(serve, "start", lambda **kw: None)
    monkeypatch.setattr(serve, "delete", lambda name: None)
    monkeypatch.setattr(serve, "run", lambda app, **kw: handlers.append(signal.getsignal(signal.SIGHUP)))
    monkeypatch.setattr(serve_app, "build_app", lambda config, model_path=None: "app")
    monkeypatch.setattr("pdserve.cli.check_joined_serve", lambda config: False)
    monkeypatch.setattr("pdserve.cli.threading.Event.wait", lambda self: None)  # served: stop at once
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        main(["serve", str(tiny_llama), "--address", "10.0.0.1:6379"])
        assert handlers == [signal.SIG_IGN] and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
