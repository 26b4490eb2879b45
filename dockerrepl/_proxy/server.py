"""One REPL's LM proxy: the ledger, the routes and an HTTP server, put together.

Served on TCP at the docker bridge gateway address, or on a unix socket inside
the code mount for ``network="none"``. Every request must carry the
per-container token.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

from .._serve import start_serving, stop_serving
from ..errors import ProxyError
from .http import DEFAULT_MAX_BODY, Handler, TCPServer, UnixServer
from .ledger import ProxyState
from .routes import Routes

__all__ = ["ProxyServer"]


class ProxyServer:
    """One REPL's proxy: TCP on ``(host, 0)`` or a unix socket path."""

    def __init__(
        self,
        state: ProxyState,
        *,
        host: Optional[str] = None,
        unix_path: Optional[str] = None,
        max_body: int = DEFAULT_MAX_BODY,
    ) -> None:
        if (host is None) == (unix_path is None):
            raise ValueError("give exactly one of host= or unix_path=")
        self.state = state
        self.routes = Routes(state)
        self.unix_path = unix_path
        self._dir_fd: Optional[int] = None
        self._server: Union[TCPServer, UnixServer]
        try:
            if unix_path is not None:
                if os.path.exists(unix_path):
                    os.unlink(unix_path)
                self._server = UnixServer(self._bindable(unix_path), Handler)
                # the container user may be anyone: the token is the access control
                os.chmod(unix_path, 0o666)
            else:
                assert host is not None
                self._server = TCPServer((host, 0), Handler)
        except OSError as exc:
            if self._dir_fd is not None:
                os.close(self._dir_fd)
            where = unix_path or f"{host}:0"
            raise ProxyError(
                f"cannot bind the LM proxy to {where}: {exc}"
                + ("" if unix_path else " (is this the docker bridge gateway of a local engine?)")
            ) from None
        self._server.state = state
        self._server.routes = self.routes
        self._server.max_body = max_body
        self._server.init_limits()
        state.on_cell_end = self._server.reap_idle
        self._thread = start_serving(self._server, "dockerrepl-proxy")

    def _bindable(self, path: str) -> str:
        """A path ``bind()`` accepts for ``path``.

        sun_path holds ~107 bytes, and a deep ``workspace_dir`` passes that. Then bind
        through ``/proc/self/fd/<fd of the directory>/name``: short whatever the depth, and
        it names the same directory (the fd stays open while the server lives, because
        stopping the server connects to that address to wake its loop).
        """
        if len(os.fsencode(path)) < 100:
            return path
        self._dir_fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
        return f"/proc/self/fd/{self._dir_fd}/{os.path.basename(path)}"

    @property
    def server(self) -> Union[TCPServer, UnixServer]:
        return self._server

    @property
    def port(self) -> int:
        if self.unix_path is not None:
            return 0
        addr: Any = self._server.server_address
        return int(addr[1])

    @property
    def host(self) -> str:
        addr: Any = self._server.server_address
        return "" if self.unix_path is not None else str(addr[0])

    def close(self) -> None:
        """Stop serving (idempotent)."""
        srv = self._server
        if getattr(srv, "_closed", False):
            return
        srv._closed = True  # type: ignore[union-attr]
        self.routes.stop()  # LM connections still in use are closed, not pooled
        stop_serving(srv, self._thread)
        self.routes.close()  # the executor, and the idle pooled LM connections
        srv.reap_idle(keep=0)  # idle kept-alive connections
        if self.unix_path:
            try:
                os.unlink(self.unix_path)
            except OSError:
                pass
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None
