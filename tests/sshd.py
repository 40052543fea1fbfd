"""A throwaway sshd on 127.0.0.1:22 for `ray up` tests, and putting back whatever a test changed on the machine.

The daemon runs from its own config, host key and authorized-keys file in a temporary directory, so the machine's
~/.ssh and /etc/ssh stay untouched; it is stopped by its process id. Ray's launcher only speaks to port 22.
Where the kernel allows it, the daemon is PID 1 of its own PID namespace: everything started over SSH (a whole
Ray cluster) lives there, `ray stop` run over SSH sees only those processes, and stopping the daemon kills them
all. Other Ray clusters on the machine are untouched."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("openssh-server", "rsync")
_SSHD = "/usr/sbin/sshd"
_POLICY_RC = Path("/usr/sbin/policy-rc.d")  # exit 101: apt must not start the system's ssh service
_PRIVSEP_DIR = Path("/run/sshd")


class MachineUnfit(Exception):
    """This machine cannot host the test (not root, no apt, port 22 taken, another Ray running)."""


@dataclass(frozen=True)
class Login:
    user: str
    private_key: Path
    namespace_pid: int | None  # the sshd's PID namespace's root process (host pid), None when not isolated


def is_listening(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def install_missing_packages() -> None:
    """apt-get install openssh-server and rsync when missing (they stay installed), never starting a service."""
    if os.path.exists(_SSHD) and shutil.which("rsync"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise MachineUnfit(f"needs {' and '.join(PACKAGES)}: install them, or run as root with apt-get")
    with _file_present(_POLICY_RC, "#!/bin/sh\nexit 101\n", mode=0o755):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, capture_output=True)
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
        subprocess.run(install, env=env, check=True, capture_output=True)


@contextmanager
def loopback_sshd(workdir: Path) -> Iterator[Login]:
    """sshd on 127.0.0.1:22 accepting one fresh key for the current user, stopped on exit."""
    if is_listening(22):
        raise MachineUnfit("127.0.0.1:22 is taken (another sshd?); Ray's launcher connects to port 22 only")
    workdir.mkdir(parents=True, exist_ok=True)
    key, host_key = workdir / "id_ed25519", workdir / "host_ed25519"
    for path in (key, host_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    (workdir / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
    config = workdir / "sshd_config"
    config.write_text(_sshd_config(workdir, host_key))
    isolated = can_isolate_pids()
    # --kill-child: when unshare ends, its child (sshd, PID 1 there) is killed, and with it the whole namespace.
    prefix = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"] if isolated else []
    with _directory_present(_PRIVSEP_DIR), open(workdir / "sshd.log", "w") as log:
        command = [*prefix, _SSHD, "-D", "-e", "-f", str(config)]
        daemon = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            _wait_listening(22, daemon)
            yield Login(_user(), key, daemon.pid if isolated else None)
        finally:
            _stop(daemon)


def can_isolate_pids() -> bool:
    """Whether this process may create PID namespaces (root outside an unprivileged container)."""
    if not shutil.which("unshare"):
        return False
    probe = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "true"]
    return subprocess.run(probe, capture_output=True).returncode == 0


def _sshd_config(workdir: Path, host_key: Path) -> str:
    return "\n".join(
        [
            "ListenAddress 127.0.0.1",
            "Port 22",
            f"HostKey {host_key}",
            f"AuthorizedKeysFile {workdir / 'authorized_keys'}",
            f"PidFile {workdir / 'sshd.pid'}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",  # the key file lives in a temporary directory
            "MaxStartups 100",  # Ray opens several connections at once
            "Subsystem sftp internal-sftp",
            "",
        ]
    )


def _wait_listening(port: int, daemon: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not is_listening(port):
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"sshd did not start (exit {daemon.poll()}); see its log beside its config")
        time.sleep(0.1)


def _stop(daemon: subprocess.Popen[bytes]) -> None:
    """The listener and its per-connection children (ssh control masters may keep some open)."""
    import psutil

    children = psutil.Process(daemon.pid).children(recursive=True)
    daemon.kill()  # unshare ignores SIGTERM; its death kills its child, and PID 1's death the namespace
    daemon.wait(timeout=10)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    psutil.wait_procs(children, timeout=5)


def _user() -> str:
    import getpass

    return getpass.getuser()


@contextmanager
def preserved(paths: list[Path]) -> Iterator[None]:
    """Put each file back as it was on exit: same bytes and mode, or absent if it was absent."""
    saved = {p: (p.read_bytes(), p.stat().st_mode) if p.exists() else None for p in paths}
    try:
        yield
    finally:
        for path, state in saved.items():
            if state is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(state[0])
                path.chmod(state[1])


@contextmanager
def _file_present(path: Path, text: str, mode: int) -> Iterator[None]:
    if path.exists():
        yield
        return
    path.write_text(text)
    path.chmod(mode)
    try:
        yield
    finally:
        path.unlink()


@contextmanager
def _directory_present(path: Path) -> Iterator[None]:
    if path.is_dir():
        yield
        return
    path.mkdir(mode=0o755)
    try:
        yield
    finally:
        shutil.rmtree(path, ignore_errors=True)
