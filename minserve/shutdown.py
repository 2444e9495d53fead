"""SIGTERM/SIGINT under granian: stop accepting at once, give in-flight requests
--shutdown-timeout seconds, then cut them (streams end with an error event, whole responses are a
503) and close the connections still open, so the process exits soon after the deadline.

NOTE: granian drains every connection before it runs the ASGI lifespan shutdown, and a
connection drains only when its response is written: a client that never reads kept the process
alive until SIGKILL. So the deadline is kept here, from the signal, and not in the lifespan."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

logger = logging.getLogger("minserve")

FLUSH_S = 1.0        # after the cut: time for the error events and 503s to be written
FORCE_EXIT_S = 10.0  # after closing connections: if granian still has not returned, exit


class GracefulShutdown:
    """shutdown = GracefulShutdown(server, app, port); loop.add_signal_handler(SIGTERM,
    shutdown.begin). A second signal cuts at once (Ctrl-C twice)."""

    def __init__(self, server: Any, app: Any, port: int) -> None:
        self.server = server
        self.app = app
        self.port = port
        self._deadline: asyncio.TimerHandle | None = None
        self._cut_done = False

    def begin(self) -> None:
        loop = asyncio.get_running_loop()
        if self._deadline is not None:  # the second signal: do not wait any longer
            self._deadline.cancel()
            self._cut()
            return
        grace_s = self.app.begin_shutdown()
        logger.info("shutting down: %d request(s) in flight get %.0f s", self.app.num_in_flight,
                    grace_s)
        self.server.stop()
        self._deadline = loop.call_later(grace_s, self._cut)

    def _cut(self) -> None:
        if self._cut_done:
            return
        self._cut_done = True
        num = self.app.num_in_flight
        if num:
            logger.warning("shutdown deadline: cutting %d request(s) still in flight", num)
        self.app.cut_in_flight()
        asyncio.get_running_loop().call_later(FLUSH_S, self._close_connections)

    def _close_connections(self) -> None:
        num = close_connections(self.port)
        if num:
            logger.warning("shutdown deadline: closed %d connection(s) still open (a client "
                           "that does not read its response)", num)
        asyncio.get_running_loop().call_later(FORCE_EXIT_S, self._force_exit)

    def _force_exit(self) -> None:
        logger.error("the HTTP server did not stop %.0f s after the shutdown deadline; exiting",
                     FLUSH_S + FORCE_EXIT_S)
        logging.shutdown()
        os._exit(1)


def close_connections(port: int) -> int:
    """shutdown(SHUT_RDWR) every accepted TCP connection of this process on local `port`: the
    server's blocked writes then fail, so its connection tasks end. Linux (/proc); elsewhere 0
    and the force-exit timer is what ends the process. -> the number closed."""
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        return 0
    num = 0
    for fd in fds:
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            # a dup: closing it below leaves the server's own descriptor alone, while shutdown()
            # acts on the connection both descriptors share
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if (sock.type == socket.SOCK_STREAM
                    and sock.family in (socket.AF_INET, socket.AF_INET6)
                    and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    and sock.getsockname()[1] == port):
                sock.shutdown(socket.SHUT_RDWR)
                num += 1
        except OSError:
            pass
        finally:
            sock.close()
    return num
