"""External programs the benchmarks run (sshd, ssh, curl, unshare), installed with apt if missing."""

from __future__ import annotations

import os
import subprocess


def ensure_tools() -> None:
    """Install missing tools non-interactively (Debian): sshd, ssh, curl.

    Only installs what is absent; a private sshd is started per run, so the
    package's own service is never needed.
    """
    wanted = {
        "/usr/sbin/sshd": "openssh-server",
        "/usr/bin/ssh": "openssh-client",
        "/usr/bin/ssh-keygen": "openssh-client",
        "/usr/bin/curl": "curl",
        "/usr/bin/unshare": "util-linux",
    }
    missing = sorted({pkg for path, pkg in wanted.items() if not os.path.exists(path)})
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
