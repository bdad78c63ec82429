"""Real daemon processes for end-to-end tests (see daemon/process.py)."""

from pqlab.process import Daemon, init_node, pq

__all__ = ["Daemon", "init_node", "pq"]
