#!/usr/bin/env bash
# Set up, then run the live demo: two nodes on this machine, a post-quantum session, data both ways.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"
