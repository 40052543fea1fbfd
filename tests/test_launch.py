"""A real launch, the way users launch pdserve: `ray up cluster_configs/local-cpu.yaml` over SSH to 127.0.0.1,
`serve deploy deploy/cpu-1p1d.yaml` onto that cluster through its (token-authenticated) dashboard, completions
through HTTP with the openai client compared with transformers' greedy output, then `ray down` — and Ray really
gone. Loopback only. Restores what it changes: ~/.bashrc (local-cpu.yaml puts the venv on the login PATH),
~/ray_bootstrap_*, a generated ~/.ray/auth_token; its sshd runs from a temporary directory (tests/sshd.py).
Other Ray clusters on the machine are safe: the cluster gets its own PID namespace (so `ray stop` sees only it),
its own Ray temp dir (so `ray.init()` elsewhere never joins it) and free ports.

Runs in CI (root, Debian packages reachable). Elsewhere it skips with the reason when the machine is unfit; in CI
(`CI` set) an unfit machine fails the test instead."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from oracle import continuation_text, load_reference_model, reference_greedy
from serving import free_port
from sshd import (
    Login,
    MachineUnfit,
    can_isolate_pids,
    install_missing_packages,
    is_listening,
    loopback_sshd,
    preserved,
)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CLUSTER_NAME = "pdserve-launch-test"
VENV = Path(sys.prefix)  # the venv running this test serves the cluster (CI's fresh one, or a checkout's)
HOME = Path.home()
CHANGED_FILES = [HOME / ".bashrc", HOME / "ray_bootstrap_config.yaml", HOME / "ray_bootstrap_key.pem"]
TOKEN = HOME / ".ray" / "auth_token"


class Ports:
    """Free ports for everything a head binds at a fixed default, so other Ray clusters here are no obstacle."""

    def __init__(self) -> None:
        self.gcs, self.dashboard, self.http = free_port(), free_port(), free_port()
        self.agent, self.client = free_port(), free_port()


def test_ray_up_serve_deploy_complete_ray_down(tmp_path: Path, smollm2_dir: Path) -> None:
    ports = Ports()
    with machine_for_launch(tmp_path) as login, ray_temp_dir() as ray_tmp:
        cluster = render_cluster(tmp_path, login, ports, ray_tmp)
        deploy = render_deploy(tmp_path, ports)
        env = cli_env(tmp_path)
        try:
            timed("ray up", [ray_cli("ray"), "up", "-y", "--no-config-cache", str(cluster)], env, 300, tmp_path)
            assert is_listening(ports.gcs) and ray_processes(login.namespace_pid)  # the check below sees Ray
            dashboard = f"http://127.0.0.1:{ports.dashboard}"
            timed("serve deploy", [ray_cli("serve"), "deploy", str(deploy), "-a", dashboard], env, 120, tmp_path)
            assert_dashboard_needs_the_token(dashboard)
            base_url = wait_serving(ports.http, timeout_s=300)
            assert_pools_in_use(env, ports.gcs)
            assert_completions_match_transformers(base_url, smollm2_dir)
        finally:
            timed("ray down", [ray_cli("ray"), "down", "-y", str(cluster)], env, 180, tmp_path)
        assert wait_no_ray_processes(login.namespace_pid, timeout_s=30) == []
        assert not is_listening(ports.gcs) and not is_listening(ports.http) and not is_listening(ports.dashboard)


def assert_dashboard_needs_the_token(dashboard: str) -> None:
    """The launched cluster's dashboard API (what `serve deploy` talks to) refuses requests without Ray's token (401)
    or with a wrong one (403), and answers with it."""
    url = f"{dashboard}/api/serve/applications/"
    assert httpx.get(url, timeout=30).status_code == 401
    assert httpx.get(url, timeout=30, headers={"Authorization": "Bearer not-the-token"}).status_code == 403
    token = TOKEN.read_text().strip()
    assert httpx.get(url, timeout=30, headers={"Authorization": f"Bearer {token}"}).status_code == 200


# ---- the machine: fit or not, and put back afterwards ----


@contextlib.contextmanager
def machine_for_launch(tmp_path: Path) -> Iterator[Login]:
    try:
        if os.geteuid() != 0:
            raise MachineUnfit("needs root to install and run sshd on 127.0.0.1 (CI runs it as root)")
        install_missing_packages()
        # `ray down` runs `ray stop`, which stops every Ray process it sees: without a PID namespace for the
        # cluster, that is every Ray process on the machine.
        if not can_isolate_pids() and wait_no_ray_processes(None, timeout_s=15):
            raise MachineUnfit("other Ray processes run on this machine and no PID namespace can isolate them")
        with preserved(CHANGED_FILES), token_present(), cleaned_up_state(), loopback_sshd(tmp_path / "sshd") as login:
            yield login
    except MachineUnfit as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI machine cannot run the launch test: {e}")
        pytest.skip(str(e))


@contextlib.contextmanager
def token_present() -> Iterator[None]:
    """The cluster's auth token (local-cpu.yaml mounts ~/.ray/auth_token): the existing one, or a new one that
    is removed afterwards."""
    with preserved([TOKEN]):
        if not TOKEN.exists():
            subprocess.run([ray_cli("ray"), "get-auth-token", "--generate"], check=True, capture_output=True)
        yield


@contextlib.contextmanager
def cleaned_up_state() -> Iterator[None]:
    """Removes the local provider's state files the head writes for this cluster and the SSH control-socket
    directories `ray up` creates. If `ray down` failed, the cluster dies with the sshd's PID namespace; without
    one, `ray stop` (no other Ray ran here: checked)."""
    control_dirs = set(Path("/tmp").glob("ray_ssh_*"))
    try:
        yield
    finally:
        if not can_isolate_pids() and wait_no_ray_processes(None, timeout_s=5):
            subprocess.run([ray_cli("ray"), "stop", "--force"], capture_output=True)
        for suffix in ("state", "lock"):
            Path(f"/tmp/ray/cluster-{CLUSTER_NAME}.{suffix}").unlink(missing_ok=True)
        for path in set(Path("/tmp").glob("ray_ssh_*")) - control_dirs:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def ray_temp_dir() -> Iterator[Path]:
    """The cluster's own Ray temp dir: `ray.init()` elsewhere on the machine never finds (and joins) it through
    /tmp/ray/ray_current_cluster. Short: Ray's socket paths live under it."""
    path = Path(tempfile.mkdtemp(prefix="pdray-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def wait_no_ray_processes(namespace_pid: int | None, timeout_s: float) -> list[str]:
    """Ray processes (what `ray stop` would stop) in the sshd's PID namespace, or on the machine when None, after
    waiting up to timeout_s for none."""
    deadline = time.monotonic() + timeout_s
    found = ray_processes(namespace_pid)
    while found and time.monotonic() < deadline:
        time.sleep(0.5)
        found = ray_processes(namespace_pid)
    return found


def ray_processes(namespace_pid: int | None) -> list[str]:
    import psutil
    from ray.autoscaler._private.constants import RAY_PROCESSES

    if namespace_pid is None:
        candidates = [p for p in psutil.process_iter() if p.pid != os.getpid()]
    else:  # orphans in a PID namespace are adopted by its PID 1: every process there descends from it
        candidates = psutil.Process(namespace_pid).children(recursive=True)
    found = []
    for proc in candidates:
        with contextlib.suppress(psutil.NoSuchProcess):
            name, args = proc.name(), " ".join(proc.cmdline())
            if any(k in (name if by_name else args) for k, by_name in RAY_PROCESSES):
                found.append(f"{proc.pid} {args[:120]}")
    return found


# ---- the files, as shipped, with this machine's venv, user, key and free ports ----


def render_cluster(tmp_path: Path, login: Login, ports: Ports, ray_tmp: Path) -> Path:
    text = (REPO / "cluster_configs" / "local-cpu.yaml").read_text()
    text = replaced(text, "$HOME/pdserve/.venv", str(VENV), count=4)
    text = replaced(text, "--port=6379", f"--port={ports.gcs}", count=1)
    text = replaced(text, "--dashboard-port=8265", f"--dashboard-port={ports.dashboard}", count=1)
    head_flags = (
        f"--temp-dir={ray_tmp} --dashboard-agent-listen-port={ports.agent} --ray-client-server-port={ports.client}"
    )
    text = replaced(text, "ray start --head", f"ray start --head {head_flags}", count=1)
    config = yaml.safe_load(text)
    config["cluster_name"] = CLUSTER_NAME
    config["auth"] = {"ssh_user": login.user, "ssh_private_key": str(login.private_key)}
    return write_yaml(tmp_path / "cluster.yaml", config)


def render_deploy(tmp_path: Path, ports: Ports) -> Path:
    config = yaml.safe_load((REPO / "deploy" / "cpu-1p1d.yaml").read_text())
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8000}
    config["http_options"]["port"] = ports.http
    return write_yaml(tmp_path / "serve.yaml", config)


def replaced(text: str, old: str, new: str, count: int) -> str:
    assert text.count(old) == count, f"local-cpu.yaml changed: expected {count} x {old!r}"
    return text.replace(old, new)


def write_yaml(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ---- the CLIs ----


def ray_cli(name: str) -> str:
    return str(VENV / "bin" / name)


def cli_env(tmp_path: Path) -> dict[str, str]:
    tmp = tmp_path / "tmp"  # `ray up`'s config cache and local-provider state
    tmp.mkdir()
    path = f"{VENV / 'bin'}:{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "RAY_AUTH_MODE": "token", "TMPDIR": str(tmp), "RAY_USAGE_STATS_ENABLED": "0"}


def timed(what: str, command: list[str], env: dict[str, str], timeout_s: float, tmp_path: Path) -> None:
    log = tmp_path / f"{what.replace(' ', '_')}.log"
    start = time.monotonic()
    with open(log, "w") as out:
        run = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s)
    print(f"{what}: {time.monotonic() - start:.1f} s")
    assert run.returncode == 0, f"{what} failed ({run.returncode}):\n{log.read_text()[-4000:]}"


def wait_serving(port: int, timeout_s: float) -> str:
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/models", timeout=5).status_code == 200:
                return base_url
        time.sleep(1.0)
    raise AssertionError(f"nothing served on {base_url} within {timeout_s} s")


def assert_pools_in_use(env: dict[str, str], gcs_port: int) -> None:
    """The prefill and decode replicas each hold one unit of their pool (the head offers 2 of each)."""
    status = subprocess.run(
        [ray_cli("ray"), "status", f"--address=127.0.0.1:{gcs_port}"], env=env, capture_output=True, text=True
    )
    assert status.returncode == 0, status.stderr
    assert "1.0/2.0 prefill_pool" in status.stdout and "1.0/2.0 decode_pool" in status.stdout, status.stdout


# ---- the served text ----


def assert_completions_match_transformers(base_url: str, smollm2_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    reference = load_reference_model(smollm2_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ref = reference.generate(torch.tensor([list(ids)]), max_new_tokens=32, do_sample=False)  # stops at EOS
    want = tokenizer.decode(ref[0, len(ids) :], skip_special_tokens=True)
    chat = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=32, temperature=0)
    assert chat.choices[0].message.content == want and "Paris" in want
    prompt = tokenizer("The three primary colors are")["input_ids"]
    want = continuation_text(tokenizer, prompt, reference_greedy(reference, prompt, 16).token_ids)
    out = client.completions.create(
        model="smollm2", prompt=prompt, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.choices[0].text == want and out.usage is not None and out.usage.completion_tokens == 16
