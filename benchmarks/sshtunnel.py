"""A private sshd on 127.0.0.1 and ``ssh -N -D`` against it: the SOCKS5 tunnel pqtunnel is compared with.

Both are context managers that kill and reap their processes and delete their
temp dirs.  The private sshd needs root: it runs in its own mount and PID
namespaces (``unshare``) and drops privileges per connection the way a system
sshd does.  OpenSSH's default algorithms are left alone.  Standard library
only; Linux only.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from addresses import free_port
from processes import ppid_map, stop_process, wait_for_log


class SshdHandle(NamedTuple):
    """A running private sshd: its port, listener pid and a client key it accepts."""

    port: int
    pid: int
    identity_file: Path


_SSHD_CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {dir}/host_ed25519
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
AllowTcpForwarding yes
# The temp dir lives under /tmp (mode 1777), which StrictModes rejects.
StrictModes no
LogLevel INFO
"""


def _namespace_init_pid(unshare_proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
    """Host pid of the program ``unshare --fork`` started (its only child)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = [p for p, pp in ppid_map().items() if pp == unshare_proc.pid]
        if kids:
            return kids[0]
        if unshare_proc.poll() is not None:
            break
        time.sleep(0.01)
    raise RuntimeError(f"no child under unshare pid {unshare_proc.pid}")


def _stop_namespace(unshare_proc: subprocess.Popen[bytes], init_pid: int | None) -> None:
    """Stop a PID namespace started by ``unshare --fork --pid --kill-child``.

    SIGTERM to the namespace init (sshd) lets it exit cleanly; when a PID
    namespace's init exits the kernel SIGKILLs and reaps everything else in
    it, so no per-connection sshd can survive or become a zombie.  unshare
    itself blocks SIGTERM, hence SIGKILL as the fallback (--kill-child then
    kills the init).
    """
    if unshare_proc.poll() is None and init_pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(init_pid, signal.SIGTERM)
        try:
            unshare_proc.wait(5)
            return
        except subprocess.TimeoutExpired:
            pass
    if unshare_proc.poll() is None:
        unshare_proc.kill()
    unshare_proc.wait()


@contextlib.contextmanager
def private_sshd(sshd_binary: str = "/usr/sbin/sshd") -> Iterator[SshdHandle]:
    """Start an isolated sshd on 127.0.0.1 with its own host key and config.

    It runs under ``unshare --mount --pid --fork`` with a tmpfs on /run, so
    its privilege-separation dir /run/sshd exists without touching the host
    (mount propagation is private, nothing leaks out).  sshd is init of its
    PID namespace: it reaps orphaned privsep children (no zombies), and
    stopping it takes every per-connection child down with it.  OpenSSH's
    default algorithms are left alone: the point is to measure what users
    get.  Yields a ``SshdHandle`` whose pid is the sshd listener (root of the
    per-connection children, for RSS); on exit everything is killed and
    reaped and the temp dir is removed.
    """
    if os.geteuid() != 0:
        raise PermissionError("private_sshd needs root (unshare, sshd privilege separation)")
    tmp = Path(tempfile.mkdtemp(prefix="pqbench-sshd-"))
    proc: subprocess.Popen[bytes] | None = None
    init_pid: int | None = None
    try:
        for key in ("host_ed25519", "client_ed25519"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key, "-f", str(tmp / key)],
                check=True,
            )
        shutil.copy(tmp / "client_ed25519.pub", tmp / "authorized_keys")
        last_err: Exception | None = None
        for _attempt in range(3):  # free_port() can race with other programs
            port = free_port()
            (tmp / "sshd_config").write_text(_SSHD_CONFIG.format(port=port, dir=tmp))
            log = tmp / "sshd.log"
            inner = (
                "mount -t tmpfs -o mode=755 tmpfs /run && mkdir -p /run/sshd && "
                f"exec {sshd_binary} -D -e -f {tmp}/sshd_config"
            )
            cmd = ["unshare", "--mount", "--propagation", "private", "--pid", "--kill-child",
                   "sh", "-c", inner]  # fmt: skip
            with open(log, "wb") as logf:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
            try:
                wait_for_log(proc, log, [rf"Server listening on 127\.0\.0\.1 port {port}\."], 10)
                init_pid = _namespace_init_pid(proc)
            except RuntimeError as e:
                last_err = e
                _stop_namespace(proc, None)
                proc = None
                continue
            yield SshdHandle(port, init_pid, tmp / "client_ed25519")
            break
        else:
            raise RuntimeError(f"private sshd failed to start: {last_err}")
    finally:
        if proc is not None:
            _stop_namespace(proc, init_pid)
        shutil.rmtree(tmp, ignore_errors=True)


class SshProxy(NamedTuple):
    """A running ``ssh -N -D``: SOCKS port, ssh client pid, negotiated kex algorithm."""

    socks_port: int
    pid: int
    negotiated_kex: str


@contextlib.contextmanager
def ssh_socks_proxy(sshd_port: int, cipher: str, identity_file: Path) -> Iterator[SshProxy]:
    """Run ``ssh -N -D 127.0.0.1:PORT -c CIPHER`` against a private sshd.

    The kex is left at OpenSSH's default (sntrup761x25519 on 9.x) and read
    back from ``ssh -v`` so the table states what was actually negotiated;
    the negotiated cipher is checked against ``cipher`` in both directions.
    ``-F none`` keeps the user's and system ssh_config out of the benchmark.
    """
    tmp = Path(tempfile.mkdtemp(prefix="pqbench-ssh-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        last_err: Exception | None = None
        for _attempt in range(3):
            socks_port = free_port()
            log = tmp / f"ssh-{socks_port}.log"
            cmd = [
                "ssh", "-F", "none", "-v", "-N",
                "-D", f"127.0.0.1:{socks_port}",
                "-c", cipher,
                "-i", str(identity_file),
                "-p", str(sshd_port),
                "-o", "IdentitiesOnly=yes",
                "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes",
                "-o", "ExitOnForwardFailure=yes",
                "-o", "ControlPath=none",
                "root@127.0.0.1",
            ]  # fmt: skip
            with open(log, "wb") as logf:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logf)
            try:
                text = wait_for_log(
                    proc,
                    log,
                    [
                        r"^debug1: kex: algorithm: (\S+)",
                        r"^Authenticated to ",
                        rf"Local forwarding listening on 127\.0\.0\.1 port {socks_port}\.",
                    ],
                    15,
                )
            except RuntimeError as e:
                last_err = e
                stop_process(proc)
                proc = None
                continue
            kex = re.search(r"^debug1: kex: algorithm: (\S+)", text, re.MULTILINE)
            assert kex is not None
            for direction in ("server->client", "client->server"):
                m = re.search(rf"^debug1: kex: {direction} cipher: (\S+)", text, re.MULTILINE)
                if not m or m.group(1) != cipher:
                    raise RuntimeError(f"asked for {cipher}, {direction} got {m and m.group(1)}")
            yield SshProxy(socks_port, proc.pid, kex.group(1))
            break
        else:
            raise RuntimeError(f"ssh -D failed to start: {last_err}")
    finally:
        if proc is not None:
            stop_process(proc)
        shutil.rmtree(tmp, ignore_errors=True)
