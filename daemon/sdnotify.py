"""systemd's notify protocol (sd_notify(3)) without a helper daemon or a library.

When systemd starts the daemon with ``Type=notify`` it sets ``NOTIFY_SOCKET`` (a unix
datagram socket, ``@`` for the abstract namespace) and, with ``WatchdogSec``, ``WATCHDOG_USEC``.
Outside systemd both are absent and every call here does nothing.
"""

from __future__ import annotations

import os
import socket

import trio

from pqtunnel import events


def notify(*lines: str) -> bool:
    """Send ``READY=1``-style lines to systemd; True if a notify socket was there."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), address)
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Half the watchdog period systemd asked for (seconds), or None without a watchdog."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


async def keep_watchdog_fed() -> None:
    """WATCHDOG=1 every half period while the event loop runs: a hung loop gets restarted."""
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(interval)


def systemd_notifier(event: events.Event) -> None:
    """An event-bus subscriber that tells systemd what the node's events say."""
    if isinstance(event, events.NodeStarted):
        notify("READY=1", f"STATUS=listening on {event.listen}, SOCKS on {event.socks}")
    elif isinstance(event, events.ConfigReloaded):
        notify("READY=1", "STATUS=configuration reloaded" if event.ok else f"STATUS=reload refused: {event.reason}")
    elif isinstance(event, events.NodeStopping):
        notify("STOPPING=1", f"STATUS=stopping ({event.signal})")
