"""The HTTP proxy on 127.0.0.1 and on a unix socket, with a real LMHandler (no docker).

Hostile input (bad tokens, oversized bodies, garbage) is tested in test_proxy_hostile.py.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import socketserver

import pytest
from concurrency import run_threads

from dockerrepl import LMHandler
from dockerrepl._proxy import ABANDONED, ProxyServer, ProxyState, ledger
from dockerrepl._serve import start_serving, stop_serving
from dockerrepl._wire import recv_frame, send_frame
from dockerrepl.clients import EchoClient, ScriptedClient
from dockerrepl.types import ModelUsageSummary, RLMChatCompletion, UsageSummary

pytestmark = pytest.mark.timeout(30)

TOKEN = "test-token-123"


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(self.unix_path)
        self.sock = s


def post(conn, path, body, cell=None, token=TOKEN):
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    if cell is not None:
        headers["X-DockerREPL-Cell"] = str(cell)
    conn.request("POST", path, body=json.dumps(body).encode(), headers=headers)
    resp = conn.getresponse()
    data = json.loads(resp.read())
    assert resp.status == 200, data
    return data


def make_proxy(tmp_path, request_kind, state):
    if request_kind == "tcp":
        proxy = ProxyServer(state, host="127.0.0.1")
        assert proxy.host == "127.0.0.1" and proxy.port > 0
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    else:
        path = str(tmp_path / "proxy.sock")
        proxy = ProxyServer(state, unix_path=path)
        assert proxy.port == 0
        conn = UnixHTTPConnection(path)
    return proxy, conn


@pytest.fixture(params=["tcp", "unix"])
def kind(request):
    return request.param


@pytest.fixture
def served(tmp_path, kind, echo_handler):
    state = ProxyState(token=TOKEN, depth=1, lm_handler_address=echo_handler.address)
    proxy, conn = make_proxy(tmp_path, kind, state)
    yield state, proxy, conn
    conn.close()
    proxy.close()


# --------------------------------------------------------------------------- the four endpoints
def test_llm_query(served):
    _, _, conn = served
    assert post(conn, "/llm_query", {"prompt": "hi", "model": None, "depth": 1}) == {
        "response": "echo:hi"
    }


def test_llm_query_batched(served):
    _, _, conn = served
    data = post(conn, "/llm_query_batched", {"prompts": ["a", "b", "c"], "model": None})
    assert data == {"responses": ["echo:a", "echo:b", "echo:c"]}
    assert post(conn, "/llm_query_batched", {"prompts": []}) == {"responses": []}


def test_rlm_query_without_subcall_fn_is_llm_query(served):
    _, _, conn = served
    assert post(conn, "/rlm_query", {"prompt": "r"}) == {"response": "echo:r"}
    assert post(conn, "/rlm_query_batched", {"prompts": ["x", "y"]}) == {
        "responses": ["echo:x", "echo:y"]
    }


def test_batched_needs_a_list(served):
    _, _, conn = served
    data = post(conn, "/llm_query_batched", {"prompts": "not a list"})
    assert set(data) == {"error"}


def test_message_list_prompt(served):
    _, _, conn = served
    prompt = [{"role": "user", "content": "as messages"}]
    assert post(conn, "/llm_query", {"prompt": prompt}) == {"response": "echo:as messages"}


def test_failed_batch_item_is_an_error_string(tmp_path, kind):
    def answer(p):
        if p == "bad":
            raise RuntimeError("kaboom")
        return "ok:" + p

    with LMHandler(ScriptedClient(answer)) as h:
        state = ProxyState(token=TOKEN, lm_handler_address=h.address)
        proxy, conn = make_proxy(tmp_path, kind, state)
        try:
            data = post(conn, "/llm_query_batched", {"prompts": ["a", "bad", "c"]}, cell=1)
            assert data["responses"][0] == "ok:a"
            assert data["responses"][2] == "ok:c"
            assert data["responses"][1].startswith("Error: ")
            assert "kaboom" in data["responses"][1]
            # only the successful ones are attributed to the cell
            assert [c["response"] for c in state.take(1)] == ["ok:a", "ok:c"]
            single = post(conn, "/llm_query", {"prompt": "bad"})
            assert set(single) == {"error"} and "kaboom" in single["error"]
        finally:
            conn.close()
            proxy.close()


def test_empty_answer_is_empty_string_not_error(tmp_path, kind):
    with LMHandler(ScriptedClient(["", "", "x", ""])) as h:
        state = ProxyState(token=TOKEN, lm_handler_address=h.address)
        proxy, conn = make_proxy(tmp_path, kind, state)
        try:
            assert post(conn, "/llm_query", {"prompt": "p"}) == {"response": ""}
            data = post(conn, "/llm_query_batched", {"prompts": ["a", "b", "c"]})
            assert sorted(data["responses"]) == ["", "", "x"]
            assert not any(r.startswith("Error") for r in data["responses"])
        finally:
            conn.close()
            proxy.close()


def test_no_lm_handler_configured(tmp_path, kind):
    proxy, conn = make_proxy(tmp_path, kind, ProxyState(token=TOKEN))
    try:
        data = post(conn, "/llm_query", {"prompt": "x"})
        assert set(data) == {"error"}
        data = post(conn, "/llm_query_batched", {"prompts": ["x", "y"]})
        assert len(data["responses"]) == 2
        assert all(r.startswith("Error: ") for r in data["responses"])
    finally:
        conn.close()
        proxy.close()


def test_unreachable_lm_handler_is_an_error_answer(tmp_path, kind):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        state = ProxyState(token=TOKEN, lm_handler_address=s.getsockname())
        proxy, conn = make_proxy(tmp_path, kind, state)
        try:
            data = post(conn, "/llm_query", {"prompt": "x"})
            assert set(data) == {"error"}
        finally:
            conn.close()
            proxy.close()


# --------------------------------------------------------------------------- rlm_query
def _completion(prompt, response):
    return RLMChatCompletion(
        root_model="sub",
        prompt=prompt,
        response=response,
        usage_summary=UsageSummary({"sub": ModelUsageSummary(1, 1, 1)}),
        execution_time=0.01,
    )


def test_rlm_query_calls_subcall_fn(tmp_path, kind):
    calls = []

    def subcall(prompt, model):
        calls.append((prompt, model))
        if prompt == "fail":
            raise RuntimeError("child RLM failed")
        return _completion(prompt, f"sub:{prompt}")

    state = ProxyState(token=TOKEN, subcall_fn=subcall, max_concurrent_subcalls=2)
    proxy, conn = make_proxy(tmp_path, kind, state)
    try:
        assert post(conn, "/rlm_query", {"prompt": "q", "model": "m1"}, cell=4) == {
            "response": "sub:q"
        }
        data = post(conn, "/rlm_query_batched", {"prompts": ["a", "fail", "c"]}, cell=4)
        assert data["responses"][0] == "sub:a"
        assert data["responses"][2] == "sub:c"
        assert data["responses"][1].startswith("Error: ")
        single = post(conn, "/rlm_query", {"prompt": "fail"}, cell=4)
        assert set(single) == {"error"}
        assert ("q", "m1") in calls
        assert [c["response"] for c in state.take(4)] == ["sub:q", "sub:a", "sub:c"]
    finally:
        conn.close()
        proxy.close()


def test_rlm_query_accepts_dict_completions(tmp_path, kind):
    state = ProxyState(
        token=TOKEN,
        subcall_fn=lambda p, m: _completion(p, "d:" + p).to_dict(),
    )
    proxy, conn = make_proxy(tmp_path, kind, state)
    try:
        assert post(conn, "/rlm_query", {"prompt": "z"}) == {"response": "d:z"}
    finally:
        conn.close()
        proxy.close()


# --------------------------------------------------------------------------- depth and cells
class _Recorder(socketserver.BaseRequestHandler):
    """A raw LM Handler that records every request frame it gets."""

    def handle(self):
        while True:
            try:
                req = recv_frame(self.request)
            except OSError:
                return
            if req is None:
                return
            self.server.seen.append(req)
            prompts = req.get("prompts")
            if prompts:
                out = {
                    "chat_completions": [{"response": f"r:{p}"} for p in prompts],
                    "chat_completion": None,
                    "error": None,
                }
            else:
                out = {
                    "chat_completion": {"response": f"r:{req.get('prompt')}"},
                    "chat_completions": None,
                    "error": None,
                }
            send_frame(self.request, out)


@pytest.fixture
def recorder():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Recorder)
    server.daemon_threads = True
    server.seen = []
    thread = start_serving(server, "recorder")
    yield server
    stop_serving(server, thread)


def test_forwards_the_environments_depth_not_the_bodys(tmp_path, kind, recorder):
    state = ProxyState(token=TOKEN, depth=3, lm_handler_address=recorder.server_address)
    proxy, conn = make_proxy(tmp_path, kind, state)
    try:
        post(conn, "/llm_query", {"prompt": "a", "depth": 0})
        post(conn, "/llm_query", {"prompt": "b", "depth": 99, "model": "mm"})
        post(conn, "/llm_query_batched", {"prompts": ["c"], "depth": 1})
        post(conn, "/rlm_query", {"prompt": "d"})  # no subcall_fn: goes to the handler
    finally:
        conn.close()
        proxy.close()
    assert [r["depth"] for r in recorder.seen] == [3, 3, 3, 3]
    assert recorder.seen[1]["model"] == "mm"
    assert "model" not in recorder.seen[0]  # omitted when null, like rlm's client
    assert recorder.seen[2]["prompts"] == ["c"]


def test_depth_routes_to_the_other_backend(tmp_path, kind):
    class Named(EchoClient):
        def completion(self, prompt):
            return self.model_name

    with LMHandler(Named("main"), other_backend_client=Named("other")) as h:
        for depth, expected in ((1, "other"), (2, "main")):
            state = ProxyState(token=TOKEN, depth=depth, lm_handler_address=h.address)
            proxy, conn = make_proxy(tmp_path, kind, state)
            try:
                # the body claims the opposite depth; the environment's wins
                body = {"prompt": "x", "depth": 2 if depth == 1 else 1}
                assert post(conn, "/llm_query", body) == {"response": expected}
            finally:
                conn.close()
                proxy.close()


def test_completions_attributed_to_the_cell_header(served):
    state, _, conn = served
    post(conn, "/llm_query", {"prompt": "one"}, cell=5)
    post(conn, "/llm_query_batched", {"prompts": ["two", "three"]}, cell=5)
    post(conn, "/llm_query", {"prompt": "later"}, cell=6)
    five = state.take(5)
    assert [c["prompt"] for c in five] == ["one", "two", "three"]
    for c in five:
        assert RLMChatCompletion.from_dict(c).response == "echo:" + c["prompt"]
        assert c["root_model"] == "echo"
    assert state.take(5) == []
    assert [c["prompt"] for c in state.take(6)] == ["later"]


def test_missing_or_bad_cell_header_is_cell_zero(served):
    state, _, conn = served
    post(conn, "/llm_query", {"prompt": "anon"})
    post(conn, "/llm_query", {"prompt": "junk"}, cell="abc")
    assert [c["prompt"] for c in state.take(0)] == ["anon", "junk"]


def test_take_drops_older_cells(served):
    state, _, conn = served
    post(conn, "/llm_query", {"prompt": "old"}, cell=1)
    post(conn, "/llm_query", {"prompt": "new"}, cell=2)
    assert [c["prompt"] for c in state.take(2)] == ["new"]
    assert state.take(1) == []  # cell 1's leftovers went with take(2)


def test_abandoned_cells_are_never_attributed(served):
    state, _, conn = served
    state.abandon_through(3)
    post(conn, "/llm_query", {"prompt": "late"}, cell=3)
    post(conn, "/llm_query", {"prompt": "next"}, cell=4)
    assert state.take(3) == []
    assert [c["prompt"] for c in state.take(4)] == ["next"]


# ------------------------------------------------------- the cell header is checked by the host
def post_status(conn, path, body, cell):
    conn.request(
        "POST",
        path,
        body=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "X-DockerREPL-Cell": str(cell)},
    )
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


@pytest.mark.parametrize("path", ["/llm_query", "/llm_query_batched", "/rlm_query", "/host_tool"])
def test_a_header_naming_a_cell_not_started_is_refused(served, path):
    # the container chose the header: a cell could book its calls to a later cell, or
    # name one above the abandoned range to be served after its own cell timed out
    state, _, conn = served
    state.current_cell = 2
    state.abandon_through(2)
    body = {"prompt": "x", "prompts": ["x"], "tool": "t"}
    for cell in (3, 5, 10**9):
        status, data = post_status(conn, path, body, cell)
        assert status == 403
        assert data == {
            "error": f"X-DockerREPL-Cell names cell {cell}, which the host has not started "
            "(it is running cell 2)"
        }
    assert state.calls == 0 and state.completions == {}
    state.current_cell = 3  # the host moves on: cell 3 is served now
    assert post(conn, "/llm_query", {"prompt": "now"}, cell=3) == {"response": "echo:now"}
    assert [c["prompt"] for c in state.take(3)] == ["now"]


def test_a_call_naming_an_older_cell_counts_for_the_running_one(served):
    # a thread that outlived cell 3 calls before the worker has started cell 4
    state, _, conn = served
    state.current_cell = 3
    post(conn, "/llm_query", {"prompt": "in 3"}, cell=3)
    assert [c["prompt"] for c in state.take(3)] == ["in 3"]
    state.current_cell = 4
    post(conn, "/llm_query", {"prompt": "late"}, cell=3)
    post(conn, "/llm_query_batched", {"prompts": ["a", "b"]}, cell=1)
    post(conn, "/llm_query", {"prompt": "own"}, cell=4)
    assert [c["prompt"] for c in state.take(4)] == ["late", "a", "b", "own"]
    assert state.completions == {}


def test_an_abandoned_cell_stays_refused_when_the_host_runs_a_later_one(served):
    state, _, conn = served
    state.current_cell = 5
    state.abandon_through(4)
    assert post(conn, "/llm_query", {"prompt": "late"}, cell=4) == {"error": ABANDONED}
    assert post(conn, "/llm_query_batched", {"prompts": ["x"]}, cell=2) == {
        "responses": [f"Error: {ABANDONED}"]
    }
    assert state.calls == 0
    assert state.take(5) == []


def test_calls_after_the_cells_result_was_taken_are_served_not_kept(served):
    # between cells nothing will take them (the next take dropped them, but only then)
    state, _, conn = served
    state.current_cell = 7
    assert state.take(7) == []
    for i in range(20):
        assert post(conn, "/llm_query", {"prompt": f"idle {i}"}, cell=7) == {
            "response": f"echo:idle {i}"
        }
    assert state.completions == {}
    assert state.calls == 20


def test_the_completions_kept_are_bounded(served, monkeypatch):
    state, _, conn = served
    state.current_cell = 1
    monkeypatch.setattr(ledger, "MAX_RECORDED", 3)
    for i in range(5):
        assert post(conn, "/llm_query", {"prompt": f"q{i}"}, cell=1) == {"response": f"echo:q{i}"}
    assert [c["prompt"] for c in state.take(1)] == ["q0", "q1", "q2"]
    assert state.unrecorded == 2
    # by size too: prompt and answer of 2,000 characters each, 5,000 bytes kept at most
    state.current_cell = 2
    monkeypatch.setattr(ledger, "MAX_RECORDED_BYTES", 5000)
    for _ in range(3):
        post(conn, "/llm_query", {"prompt": "x" * 1995}, cell=2)
    assert len(state.take(2)) == 1
    assert state.unrecorded == 4
    state.current_cell = 3  # what take() dropped is free again
    post(conn, "/llm_query", {"prompt": "small"}, cell=3)
    assert [c["prompt"] for c in state.take(3)] == ["small"]


# --------------------------------------------------------------------------- connections
def test_keep_alive_many_requests_one_connection(served):
    _, _, conn = served
    post(conn, "/llm_query", {"prompt": "0"})
    sock = conn.sock
    assert sock is not None
    for i in range(1, 30):
        assert post(conn, "/llm_query", {"prompt": str(i)}) == {"response": f"echo:{i}"}
        assert conn.sock is sock  # the proxy did not close it


def test_connection_close_is_honoured(served):
    _, _, conn = served
    conn.request(
        "POST",
        "/llm_query",
        body=b'{"prompt": "bye"}',
        headers={"Authorization": f"Bearer {TOKEN}", "Connection": "close"},
    )
    resp = conn.getresponse()
    assert json.loads(resp.read()) == {"response": "echo:bye"}
    assert resp.getheader("Connection", "").lower() == "close"


def test_concurrent_connections(served):
    state, proxy, _ = served
    results = []

    def worker(i):
        if proxy.unix_path:
            c = UnixHTTPConnection(proxy.unix_path)
        else:
            c = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        try:
            for j in range(5):
                results.append(post(c, "/llm_query", {"prompt": f"{i}-{j}"}, cell=9))
        finally:
            c.close()

    assert run_threads(worker, 8, timeout=20) == []
    assert len(results) == 40
    assert len(state.take(9)) == 40


def test_handler_address_can_change(tmp_path, kind, echo_handler):
    state = ProxyState(token=TOKEN)
    proxy, conn = make_proxy(tmp_path, kind, state)
    try:
        assert proxy.server.lm_handler_address is None
        assert set(post(conn, "/llm_query", {"prompt": "x"})) == {"error"}
        proxy.server.lm_handler_address = echo_handler.address  # rlm's update_handler_address
        assert state.lm_handler_address == echo_handler.address
        assert post(conn, "/llm_query", {"prompt": "x"}) == {"response": "echo:x"}
    finally:
        conn.close()
        proxy.close()


# --------------------------------------------------------------------------- lifecycle
def test_close_is_idempotent_and_frees_the_port(echo_handler):
    state = ProxyState(token=TOKEN, lm_handler_address=echo_handler.address)
    proxy = ProxyServer(state, host="127.0.0.1")
    port = proxy.port
    proxy.close()
    proxy.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_unix_socket_file_mode_and_removal(tmp_path):
    path = str(tmp_path / "p.sock")
    proxy = ProxyServer(ProxyState(token=TOKEN), unix_path=path)
    # any container user may connect: the token is the access control
    assert os.stat(path).st_mode & 0o777 == 0o666
    proxy.close()
    assert not os.path.exists(path)


def test_stale_unix_socket_is_replaced(tmp_path):
    path = tmp_path / "p.sock"
    path.write_text("stale")
    proxy = ProxyServer(ProxyState(token=TOKEN), unix_path=str(path))
    try:
        conn = UnixHTTPConnection(str(path))
        assert set(post(conn, "/llm_query", {"prompt": "x"})) == {"error"}
        conn.close()
    finally:
        proxy.close()


def test_exactly_one_of_host_or_unix_path(tmp_path):
    with pytest.raises(ValueError):
        ProxyServer(ProxyState(token=TOKEN))
    with pytest.raises(ValueError):
        ProxyServer(ProxyState(token=TOKEN), host="127.0.0.1", unix_path=str(tmp_path / "s"))


def test_a_batchs_rlm_calls_are_in_prompt_order_whatever_order_they_finish(tmp_path, kind):
    """rlm's contract: rlm_calls lists a batch's completions in the order of its prompts.
    Here the first prompt's child RLM finishes last."""
    import time as _time

    def subcall(prompt, model):
        _time.sleep(0.05 * (5 - int(prompt)))  # "0" is the slowest
        return _completion(prompt, f"sub:{prompt}")

    state = ProxyState(token=TOKEN, subcall_fn=subcall, max_concurrent_subcalls=5)
    proxy, conn = make_proxy(tmp_path, kind, state)
    try:
        assert post(conn, "/rlm_query", {"prompt": "4"}, cell=1) == {"response": "sub:4"}
        prompts = [str(i) for i in range(5)]
        data = post(conn, "/rlm_query_batched", {"prompts": prompts}, cell=1)
        assert data["responses"] == [f"sub:{p}" for p in prompts]
        assert post(conn, "/rlm_query", {"prompt": "3"}, cell=1) == {"response": "sub:3"}
        taken = [c["prompt"] for c in state.take(1)]
        assert taken == ["4", *prompts, "3"]  # the batch in prompt order, between the two
    finally:
        conn.close()
        proxy.close()


def test_llm_query_batched_chunks_keep_prompt_order(tmp_path, kind, monkeypatch):
    """Chunks of a large batch run concurrently and finish in any order; the later
    chunks are made to answer first here."""
    from dockerrepl._proxy import routes

    monkeypatch.setattr(routes, "BATCH_CHUNK", 2)
    client = ScriptedClient(lambda prompt: f"a:{prompt}")
    real = client.completion

    def slow_first(prompt, *args, **kwargs):
        import time as _time

        _time.sleep(0.2 if prompt in ("p0", "p1") else 0.0)
        return real(prompt, *args, **kwargs)

    client.completion = slow_first
    with LMHandler(client) as handler:
        state = ProxyState(token=TOKEN, lm_handler_address=handler.address)
        proxy, conn = make_proxy(tmp_path, kind, state)
        try:
            prompts = [f"p{i}" for i in range(6)]
            data = post(conn, "/llm_query_batched", {"prompts": prompts}, cell=2)
            assert data["responses"] == [f"a:{p}" for p in prompts]
            assert [c["prompt"] for c in state.take(2)] == prompts
        finally:
            conn.close()
            proxy.close()
