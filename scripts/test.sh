#!/usr/bin/env bash
# Set up, then run every test (unit, property, vectors, real daemons on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
