"""Which transport a session takes, and starting it (a mixin of ``Session``).

``transport="auto"`` tries the proxy path first (the seed's: an HTTP proxy on the
bridge gateway, a bind-mounted workspace) and keeps it only when the new container
shows it works here; otherwise the channel (every byte over the ``docker run -i``
pipe, ``/workspace`` in a named volume). See docs/engines.md.
"""

from __future__ import annotations

import logging
import secrets
import threading
from typing import TYPE_CHECKING, Any, Optional, Union, cast

from ._container import bridge_gateway
from ._labels import repl_labels
from ._proxy import ChannelEndpoint, ProxyServer
from ._workspace import MountedWorkspace, VolumeWorkspace
from .errors import ContainerDied, ProxyError, ReplClosed, TransportUnavailable

if TYPE_CHECKING:
    from ._container import Container
    from ._options import ReplOptions
    from ._proxy import ProxyState
    from ._workspace import FileChannel, Workspace

__all__ = ["IDLE_POLL", "PROBE_TIMEOUT", "TransportStart"]

log = logging.getLogger(__name__.rpartition(".")[0] + ".repl")

# transport="auto" found the proxy path does not work with this engine and network:
# later REPLs go straight to the channel. Keyed by (engine, network).
_CHANNEL_ONLY: dict[tuple[tuple[str, ...], str], str] = {}
#: How long the container's check that it reaches the proxy may take (transport="auto").
PROBE_TIMEOUT = 2.0
#: How often the channel's idle reader looks again (it wakes at once for output).
IDLE_POLL = 0.5


class TransportStart:
    """Picks and starts a session's transport (uses the session's attributes)."""

    if TYPE_CHECKING:
        options: ReplOptions
        state: ProxyState
        workspace: Workspace
        transport: str
        proxy: Union[ProxyServer, ChannelEndpoint, None]
        proxy_target: dict[str, Any]
        fallback_reason: str
        container: Optional[Container]
        closed: bool
        idle: threading.Event
        not_starting: threading.Event
        done: threading.Event
        idle_reader: Optional[threading.Thread]
        _close_lock: threading.Lock

        def start_container(self, restore: bool, probe: bool = False) -> dict[str, Any]: ...

    def start(self) -> None:
        """Pick the transport, create its workspace and endpoint, start the container.

        ``transport="auto"`` tries the proxy path first (the seed's: an HTTP proxy on
        the bridge gateway, a bind-mounted workspace) and keeps it only when the new
        container shows that it works here: it found the nonce the host wrote into the
        mount, and its ``/ping`` reached the proxy. Anything else (no bridge gateway of
        ours to bind, the engine refusing the bind mount, a failed check) falls back to
        the channel, and later REPLs on the same engine go there directly.

        Raises :class:`~dockerrepl.errors.ReplClosed` when the session was closed
        before or while it started (see ``Session.close``).
        """
        with self._close_lock:
            if self.closed:
                raise ReplClosed("this DockerREPL was cleaned up before its container started")
            self.not_starting.clear()
        try:
            self._start()
        finally:
            self.not_starting.set()

    def _start(self) -> None:
        opts = self.options
        self.state.token = secrets.token_urlsafe(24)
        key = (opts.engine.cache_key(), opts.network)
        want = opts.transport
        if want == "auto" and key in _CHANNEL_ONLY:
            self.fallback_reason = _CHANNEL_ONLY[key]
            want = "channel"
        if want in ("auto", "proxy"):
            try:
                self._start_proxy(probe=want == "auto")
                return
            except (ProxyError, ContainerDied) as exc:
                if want == "proxy" or self.closed:
                    raise
                self._drop_proxy_attempt()
                self.fallback_reason = str(exc)
                _CHANNEL_ONLY[key] = self.fallback_reason
        self._start_channel()

    def _start_proxy(self, probe: bool) -> None:
        opts = self.options
        self.transport = "proxy"
        ws = MountedWorkspace(opts.workspace_dir, shared=opts.user is not None)
        self.workspace = ws
        ws.create(repl_labels(""))
        if opts.network == "none":
            host_path, container_path = ws.proxy_socket()
            self.proxy = ProxyServer(self.state, unix_path=host_path)
            self.proxy_target = {"unix": container_path}
        else:
            self.proxy = ProxyServer(self.state, host=bridge_gateway(opts.engine))
            self.proxy_target = {"host": "host.docker.internal", "port": self.proxy.port}
        ready = self.start_container(restore=False, probe=probe)
        if probe:
            found = ready.get("probe")
            if not isinstance(found, dict):
                found = {}
            if found.get("nonce") != ws.probe_nonce():
                raise TransportUnavailable(
                    "the engine does not see this host's files (the workspace's nonce was"
                    " not in the container): it runs elsewhere"
                )
            if found.get("proxy") != "ok":
                raise TransportUnavailable(
                    f"the container could not reach the LM proxy at {self.proxy_target}:"
                    f" {str(found.get('proxy'))[:300]}"
                )
        log.debug("dockerrepl: transport proxy (%s)", self.proxy_target)

    def _drop_proxy_attempt(self) -> None:
        """Undo a proxy start that did not work here: container, proxy, workspace."""
        container, self.container = self.container, None
        if container is not None:
            container.kill()
        if self.proxy is not None:
            self.proxy.close()
            self.proxy = None
        self.workspace.remove()

    def _start_channel(self) -> None:
        opts = self.options
        self.transport = "channel"
        ws = VolumeWorkspace(opts.workspace_dir, opts.engine, shared=opts.user is not None)
        self.workspace = ws
        ws.files = cast("FileChannel", self)  # the session is one (SessionFiles)
        ws.create(repl_labels(""))
        ws.prepare(opts.image)
        self.proxy = ChannelEndpoint(self.state)
        self.proxy_target = {"relay": True}
        self.start_container(restore=False)
        self.idle_reader = threading.Thread(
            target=self._idle_reader, name="dockerrepl-channel-idle", daemon=True
        )
        self.idle_reader.start()
        log.debug(
            "dockerrepl: transport channel (volume %s)%s",
            ws.name,
            f"; the proxy path does not work here: {self.fallback_reason}"
            if self.fallback_reason
            else "",
        )

    def _idle_reader(self) -> None:
        """The channel transport, between calls: answer the container's LM calls.

        Code a cell left running (a thread, a child) may call ``llm_query`` after its
        cell returned; with the proxy its request is served at once, so with the
        channel too. One thread per channel session, blocked in select() while idle.
        """
        while not self.closed:
            if not self.idle.wait(IDLE_POLL):
                continue
            container = self.container
            if container is None or not container.poll_rpc(IDLE_POLL):
                # replaced or gone (the next call restarts it), or closed: then at once
                self.done.wait(IDLE_POLL)
