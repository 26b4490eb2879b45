"""The host's side of ``llm_query()``: what the container may ask, and two ways in.

The parts, each in its own module:

* :mod:`.ledger`: the LM-call ledger of one REPL (``ProxyState``): budgets,
  reservations before dispatch, attribution of calls to cells, abandonment;
* :mod:`.routes`: what the container may ask for (``/llm_query``, the batched
  and ``rlm_query`` variants, ``/host_tool``) and the LM Handler connection
  pool; a route takes a parsed request and returns ``(status, reply)``, and
  knows nothing of HTTP;
* :mod:`.http`: the minimal HTTP/1.1 server side (request parsing, the token,
  body and connection caps, idle reaping, the TCP and unix servers);

* :mod:`.channel`: the same routes reached through ``rpc`` frames on the
  container's stdio (the channel transport), with the same checks;

and :mod:`.server` puts ledger, routes and HTTP together as one REPL's
:class:`ProxyServer`; :class:`ChannelEndpoint` is its counterpart for the channel.
"""

from .channel import ChannelEndpoint
from .http import MAX_CONNECTIONS, MAX_INFLIGHT_BODY
from .ledger import ABANDONED, MAX_LM_INFLIGHT, MAX_RECORDED, MAX_RECORDED_BYTES, ProxyState
from .routes import BATCH_CHUNK, BATCH_WINDOW, MAX_BATCH_PROMPTS
from .server import ProxyServer

__all__ = [
    "ABANDONED",
    "BATCH_CHUNK",
    "BATCH_WINDOW",
    "MAX_BATCH_PROMPTS",
    "MAX_CONNECTIONS",
    "MAX_INFLIGHT_BODY",
    "MAX_LM_INFLIGHT",
    "MAX_RECORDED",
    "MAX_RECORDED_BYTES",
    "ChannelEndpoint",
    "ProxyServer",
    "ProxyState",
]
