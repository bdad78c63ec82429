#!/usr/bin/env bash
# Fuzz every parser (scripts/fuzz.py). Usage: bash scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
# Coverage-guided with atheris when it is installed (one target per process), else a seeded mutation loop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
seconds=${1:-60}; shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(.venv/bin/python scripts/fuzz.py --list)
for target in "${targets[@]}"; do
    echo "== $target (${seconds} s)"
    .venv/bin/python scripts/fuzz.py --seconds "$seconds" "$target"
done
