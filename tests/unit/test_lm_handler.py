"""LMHandler over real TCP sockets: rlm's wire contract (reference/rlm-contract.md §1)."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from concurrency import run_threads
from docker_helpers import import_or_skip

from dockerrepl import LMHandler
from dockerrepl._serve import start_serving, stop_serving
from dockerrepl._wire import HEADER, encode_frame, recv_frame, send_frame
from dockerrepl.clients import EchoClient, ScriptedClient
from dockerrepl.errors import LMHandlerError
from dockerrepl.lm_handler import LMConnection, send_lm_request, send_lm_request_batched
from dockerrepl.types import ModelUsageSummary

pytestmark = pytest.mark.timeout(30)

KEYS = {"chat_completion", "chat_completions", "error"}
C_KEYS = {"root_model", "prompt", "response", "usage_summary", "execution_time"}


def ask(address, obj):
    """rlm's client: one frame, one answer, close."""
    with socket.create_connection(address, timeout=10) as s:
        send_frame(s, obj)
        resp = recv_frame(s)
    assert isinstance(resp, dict)
    assert set(resp) == KEYS  # always all three keys
    return resp


def check_completion(c, prompt, root, response):
    assert C_KEYS <= set(c) <= C_KEYS | {"metadata", "error"}
    assert c["prompt"] == prompt
    assert c["root_model"] == root
    assert c["response"] == response
    assert isinstance(c["execution_time"], float)
    assert c["execution_time"] >= 0
    assert set(c["usage_summary"]) <= {"model_usage_summaries", "total_cost"}
    for name, u in c["usage_summary"]["model_usage_summaries"].items():
        assert isinstance(name, str)
        assert {"total_calls", "total_input_tokens", "total_output_tokens"} <= set(u)


@pytest.fixture
def echo(echo_handler):
    return echo_handler  # the shared fixture (tests/conftest.py), by a shorter name


# --------------------------------------------------------------------------- dispatch
def test_single(echo):
    resp = ask(echo.address, {"prompt": "hello there", "depth": 1})
    assert resp["error"] is None and resp["chat_completions"] is None
    c = resp["chat_completion"]
    check_completion(c, "hello there", "echo", "echo:hello there")
    usage = c["usage_summary"]["model_usage_summaries"]["echo"]
    assert usage == {"total_calls": 1, "total_input_tokens": 2, "total_output_tokens": 2}
    assert "error" not in c and "metadata" not in c  # omitted when null


def test_single_message_list_prompt_kept_as_sent(echo):
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    c = ask(echo.address, {"prompt": prompt})["chat_completion"]
    check_completion(c, prompt, "echo", "echo:hi")


def test_batched_keeps_order(echo):
    prompts = [f"p{i}" for i in range(40)]
    resp = ask(echo.address, {"prompts": prompts, "depth": 1})
    assert resp["error"] is None and resp["chat_completion"] is None
    comps = resp["chat_completions"]
    assert [c["response"] for c in comps] == [f"echo:p{i}" for i in range(40)]
    for c, p in zip(comps, prompts):
        check_completion(c, p, "echo", "echo:" + p)


def test_batched_takes_precedence_over_prompt(echo):
    resp = ask(echo.address, {"prompt": "single", "prompts": ["a", "b"]})
    assert [c["response"] for c in resp["chat_completions"]] == ["echo:a", "echo:b"]
    # an empty prompts list falls back to the single prompt
    resp = ask(echo.address, {"prompt": "single", "prompts": []})
    assert resp["chat_completion"]["response"] == "echo:single"


def test_one_failing_prompt_in_a_batch():
    def answer(prompt):
        if prompt == "bad":
            raise RuntimeError("model on fire")
        return "ok:" + prompt

    with LMHandler(ScriptedClient(answer, model_name="m")) as h:
        resp = ask(h.address, {"prompts": ["a", "bad", "c"]})
    assert resp["error"] is None
    a, bad, c = resp["chat_completions"]
    check_completion(a, "a", "m", "ok:a")
    check_completion(c, "c", "m", "ok:c")
    assert "error" not in a and "error" not in c
    assert bad["response"] == ""
    assert bad["prompt"] == "bad"
    assert bad["root_model"] == "m"
    assert bad["usage_summary"] == {"model_usage_summaries": {}}
    assert bad["execution_time"] == 0
    assert bad["error"].startswith("llm() call failed - ")
    assert "model on fire" in bad["error"]


def test_single_failure_is_an_error_response():
    with LMHandler(ScriptedClient([], model_name="m")) as h:
        resp = ask(h.address, {"prompt": "x"})
    assert resp["chat_completion"] is None and resp["chat_completions"] is None
    assert isinstance(resp["error"], str) and resp["error"]


@pytest.mark.parametrize(
    "req",
    [{}, {"prompt": ""}, {"prompt": None}, {"prompts": []}, {"model": "echo", "depth": 1}],
)
def test_missing_prompt(echo, req):
    resp = ask(echo.address, req)
    assert resp["error"] == "Missing 'prompt' or 'prompts' in request."
    assert resp["chat_completion"] is None and resp["chat_completions"] is None


@pytest.mark.parametrize("req", [["prompt", "x"], "a string", 42, None, True])
def test_non_object_request(echo, req):
    resp = ask(echo.address, req)
    assert resp["error"] == "Request must be a JSON object"


def test_bad_json_body_gets_error_frame_and_connection_lives(echo):
    with socket.create_connection(echo.address, timeout=10) as s:
        s.sendall(HEADER.pack(5) + b"{oops")
        resp = recv_frame(s)
        assert set(resp) == KEYS and resp["error"]
        send_frame(s, {"prompt": "after"})
        assert recv_frame(s)["chat_completion"]["response"] == "echo:after"


def test_deeply_nested_request_gets_an_error_frame_and_the_connection_lives(echo):
    # json.loads raises RecursionError on it; that used to close the connection unanswered
    deep = b'{"prompt":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with socket.create_connection(echo.address, timeout=10) as s:
        for _ in range(2):
            s.sendall(HEADER.pack(len(deep)) + deep)
            resp = recv_frame(s)
            assert set(resp) == KEYS
            assert "nested too deeply" in resp["error"]
        send_frame(s, {"prompt": "after"})
        assert recv_frame(s)["chat_completion"]["response"] == "echo:after"


def test_an_answer_json_cannot_write_is_an_error_frame(echo, monkeypatch):
    real = LMHandler._answer

    def odd(self, req, server):
        if req.get("prompt") == "odd":
            return {"chat_completion": {"response": object()}, "error": None}
        return real(self, req, server)

    monkeypatch.setattr(LMHandler, "_answer", odd)
    with socket.create_connection(echo.address, timeout=10) as s:
        send_frame(s, {"prompt": "odd"})
        resp = recv_frame(s)
        assert set(resp) == KEYS and "could not be encoded" in resp["error"]
        send_frame(s, {"prompt": "after"})
        assert recv_frame(s)["chat_completion"]["response"] == "echo:after"


# --------------------------------------------------------------------------- routing
class Named(EchoClient):
    def completion(self, prompt):
        return f"{self.model_name}:{prompt}"


@pytest.fixture
def routed():
    h = LMHandler(Named("default"), other_backend_client=Named("other"))
    h.register_client("special", Named("special"))
    with h:
        yield h


@pytest.mark.parametrize(
    ("req", "served_by", "root"),
    [
        ({"prompt": "x"}, "default", "default"),  # no depth on the wire means -1
        ({"prompt": "x", "depth": 0}, "default", "default"),
        ({"prompt": "x", "depth": 1}, "other", "other"),
        ({"prompt": "x", "depth": 2}, "default", "default"),
        ({"prompt": "x", "depth": 1, "model": "special"}, "special", "special"),
        ({"prompt": "x", "depth": 0, "model": "other"}, "other", "other"),
        ({"prompt": "x", "depth": 0, "model": "default"}, "default", "default"),
        # an unknown model name falls through to depth routing; root_model is the name asked for
        ({"prompt": "x", "depth": 1, "model": "unknown"}, "other", "unknown"),
        ({"prompt": "x", "depth": 3, "model": "unknown"}, "default", "unknown"),
    ],
)
def test_routing(routed, req, served_by, root):
    c = ask(routed.address, req)["chat_completion"]
    assert c["response"] == f"{served_by}:x"
    assert c["root_model"] == root


def test_routing_applies_to_batches(routed):
    resp = ask(routed.address, {"prompts": ["a", "b"], "depth": 1})
    assert [c["response"] for c in resp["chat_completions"]] == ["other:a", "other:b"]
    resp = ask(routed.address, {"prompts": ["a"], "depth": 1, "model": "special"})
    assert resp["chat_completions"][0]["response"] == "special:a"


def test_get_client_without_other_backend():
    h = LMHandler(Named("only"))
    assert h.get_client(None, 1).model_name == "only"
    assert h.get_client("nope", 1).model_name == "only"


# --------------------------------------------------------------------------- connections
def test_several_frames_on_one_connection(echo):
    with socket.create_connection(echo.address, timeout=10) as s:
        for i in range(20):
            send_frame(s, {"prompt": f"n{i}", "depth": 1})
            assert recv_frame(s)["chat_completion"]["response"] == f"echo:n{i}"
        # pipelined: three requests before reading
        s.sendall(b"".join(encode_frame({"prompt": f"p{i}"}) for i in range(3)))
        got = [recv_frame(s)["chat_completion"]["response"] for _ in range(3)]
        assert got == ["echo:p0", "echo:p1", "echo:p2"]


def test_one_frame_then_close_clients(echo):
    # rlm's clients: connect, one frame, read, close; many in a row and at once
    results = []

    def one(i):
        results.append(ask(echo.address, {"prompt": f"c{i}"})["chat_completion"]["response"])

    assert run_threads(one, 20, timeout=20) == []
    assert sorted(results) == sorted(f"echo:c{i}" for i in range(20))


def test_client_that_closes_without_sending(echo):
    for _ in range(5):
        socket.create_connection(echo.address, timeout=5).close()
    assert ask(echo.address, {"prompt": "still here"})["chat_completion"]["response"]


class Gate(EchoClient):
    """Counts prompts in flight; each waits at a barrier of ``parties``."""

    def __init__(self, parties):
        super().__init__("gate")
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0
        self.barrier = threading.Barrier(parties, timeout=10)

    def completion(self, prompt):
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            self.barrier.wait()  # proves `parties` prompts really run at once
        finally:
            with self.lock:
                self.now -= 1
        return super().completion(prompt)


def test_batch_max_concurrent_is_respected():
    gate = Gate(3)
    with LMHandler(gate, batch_max_concurrent=3) as h:
        resp = ask(h.address, {"prompts": [f"q{i}" for i in range(21)]})
    assert resp["error"] is None
    assert [c["response"] for c in resp["chat_completions"]] == [f"echo:q{i}" for i in range(21)]
    assert gate.peak == 3


def test_batch_max_concurrent_one_is_sequential():
    gate = Gate(1)
    with LMHandler(gate, batch_max_concurrent=1) as h:
        resp = ask(h.address, {"prompts": ["a", "b", "c", "d"]})
    assert len(resp["chat_completions"]) == 4
    assert gate.peak == 1


def test_batch_max_concurrent_validated():
    with pytest.raises(ValueError):
        LMHandler(EchoClient(), batch_max_concurrent=0)


# --------------------------------------------------------------------------- lifecycle
def test_address_before_start_raises():
    h = LMHandler(EchoClient())
    with pytest.raises(LMHandlerError):
        _ = h.address


def test_start_stop_idempotent():
    h = LMHandler(EchoClient())
    addr = h.start()
    assert h.start() == addr == h.address
    assert addr[0] == "127.0.0.1" and addr[1] > 0
    assert ask(addr, {"prompt": "x"})["chat_completion"]
    h.stop()
    h.stop()
    with pytest.raises(LMHandlerError):
        _ = h.address
    with pytest.raises(OSError):
        socket.create_connection(addr, timeout=2).close()
    # and it can be started again
    addr2 = h.start()
    try:
        assert ask(addr2, {"prompt": "again"})["chat_completion"]["response"] == "echo:again"
    finally:
        h.stop()


def test_context_manager_stops():
    with LMHandler(EchoClient()) as h:
        addr = h.address
    with pytest.raises(OSError):
        socket.create_connection(addr, timeout=2).close()


def test_listen_failure_is_lm_handler_error():
    with LMHandler(EchoClient()) as h:
        busy = LMHandler(EchoClient(), port=h.address[1])
        with pytest.raises(LMHandlerError):
            # same port, no SO_REUSEPORT: the bind fails while the first one listens
            busy.start()


# --------------------------------------------------------------------------- client helpers
def test_send_lm_request_helpers(routed):
    resp = send_lm_request(routed.address, "hi")
    assert set(resp) == KEYS
    assert resp["chat_completion"]["response"] == "default:hi"  # depth 0 by default
    resp = send_lm_request(routed.address, "hi", depth=1)
    assert resp["chat_completion"]["response"] == "other:hi"
    resp = send_lm_request(routed.address, "hi", model="special", depth=1)
    assert resp["chat_completion"]["response"] == "special:hi"
    resp = send_lm_request_batched(routed.address, ["a", "b"], depth=1)
    assert [c["response"] for c in resp["chat_completions"]] == ["other:a", "other:b"]


def test_send_lm_request_unreachable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        with pytest.raises(LMHandlerError):
            send_lm_request(("127.0.0.1", port), "x", timeout=5)


class _OneShot(socketserver.BaseRequestHandler):
    """rlm's server behaviour: read one frame, answer it, close."""

    def handle(self):
        req = recv_frame(self.request)
        self.server.seen.append(req)
        send_frame(
            self.request,
            {
                "chat_completion": {"response": f"one-shot:{req.get('prompt')}"},
                "chat_completions": None,
                "error": None,
            },
        )


@contextlib.contextmanager
def _serving(handler: type[socketserver.BaseRequestHandler], name: str) -> Iterator[Any]:
    """A threaded TCP server on loopback whose handler appends each request to ``seen``."""
    server: Any = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.seen = []
    thread = start_serving(server, name)
    try:
        yield server
    finally:
        stop_serving(server, thread)


def test_lm_connection_reuse_against_a_one_reply_server():
    with _serving(_OneShot, "oneshot") as server:
        with LMConnection(server.server_address, timeout=10) as conn:
            for i in range(5):
                resp = conn.request({"prompt": f"r{i}", "depth": 2})
                assert resp["chat_completion"]["response"] == f"one-shot:r{i}"
        assert [r["prompt"] for r in server.seen] == [f"r{i}" for i in range(5)]
        assert all(r["depth"] == 2 for r in server.seen)


class _BadSecondReply(socketserver.BaseRequestHandler):
    """Answers the first frame of a connection, then answers with a body that is not JSON."""

    def handle(self):
        n = 0
        while True:
            req = recv_frame(self.request)
            if req is None:
                return
            self.server.seen.append(req)
            n += 1
            if n == 1:
                send_frame(self.request, {"chat_completion": {"response": "ok"}, "error": None})
            else:
                self.request.sendall(HEADER.pack(5) + b"{oops")


def test_lm_connection_never_sends_a_request_again_after_a_reply_came():
    # the handler had the request (it answered, badly): a retry would run the LM twice
    with _serving(_BadSecondReply, "bad-second-reply") as server:
        with LMConnection(server.server_address, timeout=10) as conn:
            assert conn.request({"prompt": "one"})["chat_completion"]["response"] == "ok"
            with pytest.raises(LMHandlerError, match="not valid UTF-8 JSON"):
                conn.request({"prompt": "two"})
        assert [r["prompt"] for r in server.seen] == ["one", "two"]


def test_lm_connection_keeps_one_socket_with_our_server(echo):
    with LMConnection(echo.address, timeout=10) as conn:
        conn.request({"prompt": "a"})
        first = conn._sock
        for i in range(5):
            assert conn.request({"prompt": str(i)})["chat_completion"]["response"] == f"echo:{i}"
        assert conn._sock is first


def test_rlm_client_helpers_against_our_handler(echo):
    comms = import_or_skip("rlm.core.comms_utils", "needs rlm: pip install rlms")
    resp = comms.send_lm_request(echo.address, comms.LMRequest(prompt="from rlm", depth=1))
    assert resp.success
    assert resp.chat_completion.response == "echo:from rlm"
    assert resp.chat_completion.usage_summary.model_usage_summaries["echo"].total_calls == 1
    batch = comms.send_lm_request_batched(echo.address, ["x", "y"], depth=1)
    assert [r.chat_completion.response for r in batch] == ["echo:x", "echo:y"]


def test_usage_comes_from_get_last_usage():
    class Counting(EchoClient):
        def get_last_usage(self):
            return ModelUsageSummary(1, 111, 222, 0.5)

    with LMHandler(Counting("c")) as h:
        c = ask(h.address, {"prompt": "x"})["chat_completion"]
    assert c["usage_summary"]["model_usage_summaries"]["c"] == {
        "total_calls": 1,
        "total_input_tokens": 111,
        "total_output_tokens": 222,
        "total_cost": 0.5,
    }
    assert c["usage_summary"]["total_cost"] == 0.5


def test_client_without_usage_methods():
    class Bare:
        model_name = "bare"

        def completion(self, prompt):
            return None  # an LM that says nothing: "" on the wire, not an error

    with LMHandler(Bare()) as h:
        c = ask(h.address, {"prompt": "x"})["chat_completion"]
    assert c["response"] == ""
    assert c["usage_summary"]["model_usage_summaries"]["bare"]["total_calls"] == 0


# ---------------------------------------------------------------- stop() and open connections
class Blocking(EchoClient):
    """Counts calls; each call waits for ``release`` (set it to let calls through)."""

    def __init__(self, block=True):
        super().__init__("blocking")
        self.lock = threading.Lock()
        self.calls = []
        self.threads = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not block:
            self.release.set()

    def completion(self, prompt):
        with self.lock:
            self.calls.append(prompt)
            self.threads.append(threading.current_thread())
        self.entered.set()
        assert self.release.wait(20)
        return super().completion(prompt)


def closed_by_peer(sock):
    """True when the peer has closed (EOF or reset) and sent nothing more."""
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_stop_closes_a_kept_alive_connection():
    client = Blocking(block=False)
    h = LMHandler(client)
    with socket.create_connection(h.start(), timeout=10) as s:
        send_frame(s, {"prompt": "one"})
        assert recv_frame(s)["chat_completion"]["response"] == "echo:one"
        (conn_thread,) = client.threads  # a single prompt runs in the connection's thread
        h.stop()
        assert not conn_thread.is_alive()
        try:
            send_frame(s, {"prompt": "after-stop"})
        except OSError:
            pass  # already reset: as good as a close
        assert closed_by_peer(s)
    assert client.calls == ["one"]  # the frame after stop() reached no client


def test_stop_answers_nothing_after_it_began_single_call_in_flight():
    client = Blocking()
    h = LMHandler(client)
    with socket.create_connection(h.start(), timeout=10) as s:
        send_frame(s, {"prompt": "slow"})
        assert client.entered.wait(10)
        h.stop(timeout=0.2)  # the call is inside the client: waited for, bounded
        client.release.set()
        assert closed_by_peer(s)  # its answer is dropped, the connection closed
    assert client.calls == ["slow"]


def test_stop_cancels_the_rest_of_a_batch():
    client = Blocking()
    h = LMHandler(client, batch_max_concurrent=1)
    with socket.create_connection(h.start(), timeout=10) as s:
        send_frame(s, {"prompts": ["p0", "p1", "p2", "p3"]})
        assert client.entered.wait(10)
        h.stop(timeout=0.2)
        client.release.set()
        assert closed_by_peer(s)
        (t,) = set(client.threads)
        t.join(10)
    assert client.calls == ["p0"]  # no prompt after stop() reached the client


def test_a_request_through_a_stopped_run_is_refused_even_if_restarted():
    client = Blocking(block=False)
    h = LMHandler(client)
    addr = h.start()
    try:
        with socket.create_connection(addr, timeout=10) as s:
            send_frame(s, {"prompt": "a"})
            assert recv_frame(s)["error"] is None
            h.stop()
            assert h.start() == addr  # restartable, on the same port
            try:
                send_frame(s, {"prompt": "old-connection"})
            except OSError:
                pass
            assert closed_by_peer(s)
        assert ask(addr, {"prompt": "new"})["chat_completion"]["response"] == "echo:new"
    finally:
        h.stop()
    assert client.calls == ["a", "new"]


def test_stop_is_thread_safe():
    h = LMHandler(EchoClient())
    addr = h.start()
    socks = [socket.create_connection(addr, timeout=10) for _ in range(5)]
    try:
        for s in socks:  # each connection is being served (its thread exists)
            send_frame(s, {"prompt": "x"})
            assert recv_frame(s)["error"] is None
        assert run_threads(lambda _: h.stop(), 4, timeout=20) == []
        assert all(closed_by_peer(s) for s in socks)
        with pytest.raises(LMHandlerError):
            _ = h.address
    finally:
        for s in socks:
            s.close()


def test_lm_connection_after_stop_raises_lm_handler_error():
    """What the proxy's kept connection sees: a clean LMHandlerError, never a hang."""
    h = LMHandler(EchoClient())
    conn = LMConnection(h.start(), timeout=10)
    try:
        assert conn.request({"prompt": "a"})["error"] is None
        h.stop()
        with pytest.raises(LMHandlerError):
            conn.request({"prompt": "b"})
        h.start()  # same port again: the connection reconnects
        assert conn.request({"prompt": "c"})["chat_completion"]["response"] == "echo:c"
    finally:
        conn.close()
        h.stop()


def test_proxy_llm_query_after_handler_stop_is_an_error_answer():
    import http.client
    import json

    from dockerrepl._proxy import ProxyServer, ProxyState

    client = Blocking(block=False)
    h = LMHandler(client)
    state = ProxyState(token="t", depth=1, lm_handler_address=h.start())
    proxy = ProxyServer(state, host="127.0.0.1")
    http_conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)

    def llm_query(path, body):
        http_conn.request(
            "POST", path, body=json.dumps(body).encode(), headers={"Authorization": "Bearer t"}
        )
        resp = http_conn.getresponse()
        assert resp.status == 200
        return json.loads(resp.read())

    try:
        assert llm_query("/llm_query", {"prompt": "a"}) == {"response": "echo:a"}
        h.stop()
        data = llm_query("/llm_query", {"prompt": "b"})
        assert set(data) == {"error"}
        data = llm_query("/llm_query_batched", {"prompts": ["c", "d"]})
        assert all(r.startswith("Error: ") for r in data["responses"])
    finally:
        http_conn.close()
        proxy.close()
        h.stop()
    assert client.calls == ["a"]
