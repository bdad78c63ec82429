#!/usr/bin/env bash
# Set up everything pqtunnel needs on a fresh Debian machine: system tools and a virtualenv.
# Idempotent: a second run only checks. Needs root (or sudo) only to install Debian packages.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(curl iproute2 util-linux avahi-daemon avahi-utils dbus etcd-server openssh-client openssl)  # etcd-server: /usr/bin/etcd (HA store tests); ssh-keygen, openssl: real keys in the migration tests
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
echo "setup: ready ($(.venv/bin/python -c 'import cryptography; print("cryptography", cryptography.__version__)'))"
