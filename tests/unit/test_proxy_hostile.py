"""Hostile input to the HTTP proxy and the LM Handler, over real sockets (no docker).

Every attack ends with a real request that must still be answered: the servers
keep serving. Budgets and abandoned cells are here too (they are the proxy's).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import tracemalloc

import pytest
from bootstrap_process import load_package
from concurrency import run_threads

from dockerrepl import LMHandler
from dockerrepl._proxy import (
    ABANDONED,
    BATCH_CHUNK,
    BATCH_WINDOW,
    MAX_BATCH_PROMPTS,
    MAX_CONNECTIONS,
    MAX_LM_INFLIGHT,
    ProxyServer,
    ProxyState,
)
from dockerrepl._proxy import http as proxy_http
from dockerrepl._wire import HEADER, MAX_JSON_UNITS, encode_frame, recv_frame, send_frame
from dockerrepl.clients import ScriptedClient

pytestmark = pytest.mark.timeout(60)

TOKEN = "hostile-test-token"


# --------------------------------------------------------------------------- helpers
def raw_http(sock_or_addr, data: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send raw bytes, read one HTTP answer: (status, body). Status 0: closed, no answer."""
    if isinstance(sock_or_addr, socket.socket):
        s = sock_or_addr
    elif isinstance(sock_or_addr, str):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock_or_addr)
    else:
        s = socket.create_connection(sock_or_addr)
    s.settimeout(timeout)
    try:
        if data:
            s.sendall(data)
        f = s.makefile("rb")
        status_line = f.readline()
        if not status_line:
            return 0, b""
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = f.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, f.read(length)
    finally:
        if not isinstance(sock_or_addr, socket.socket):
            s.close()


def request(path: str, body: bytes, token: str | None = TOKEN, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
    if token is not None:
        head += f"Authorization: Bearer {token}\r\n"
    return (head + extra + "\r\n").encode() + body


def ask(where, prompt: str = "hi", cell: int = 0) -> dict:
    body = json.dumps({"prompt": prompt}).encode()
    status, data = raw_http(
        where, request("/llm_query", body, extra=f"X-DockerREPL-Cell: {cell}\r\n")
    )
    assert status == 200
    return json.loads(data)


def alive(where) -> None:
    assert ask(where, "still there?") == {"response": "echo:still there?"}


@pytest.fixture(params=["tcp", "unix"])
def proxy(request, tmp_path, echo_handler):
    state = ProxyState(token=TOKEN, lm_handler_address=echo_handler.address)
    if request.param == "tcp":
        p = ProxyServer(state, host="127.0.0.1", max_body=4096)
        where: object = ("127.0.0.1", p.port)
    else:
        p = ProxyServer(state, unix_path=str(tmp_path / "p.sock"), max_body=4096)
        where = str(tmp_path / "p.sock")
    yield p, where
    p.close()


# --------------------------------------------------------------------------- status codes
@pytest.mark.parametrize(
    ("data", "status"),
    [
        (request("/llm_query", b'{"prompt":"x"}', token=None), 401),
        (request("/llm_query", b'{"prompt":"x"}', token="wrong"), 401),
        (request("/llm_query", b'{"prompt":"x"}', token=TOKEN + "x"), 401),
        (request("/llm_query", b'{"prompt":"x"}', token=""), 401),
        (request("/llm_query", b"x" * 5000), 413),
        (request("/llm_query", b"{not json"), 400),
        (request("/llm_query", b"\xff\xfe"), 400),
        (request("/llm_query", b"[1, 2]"), 400),
        (request("/llm_query", b'{"prompt":' + b"[" * 2000 + b"]" * 2000 + b"}"), 400),
        (request("/nope", b"{}"), 404),
        (request("/llm_query/../host_tool", b"{}"), 404),
        (b"GARBAGE\r\n\r\n", 400),
        (b"POST /llm_query HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"POST /llm_query HTTP/1.1\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n\r\n", 411),
        (b"POST /llm_query HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400),
        (b"POST /llm_query HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
        (b"GET / HTTP/1.1\r\n\r\n", 405),
        (b"POST /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 431),
        (b"POST /q HTTP/1.1\r\n" + b"".join(b"X%d: y\r\n" % i for i in range(101)) + b"\r\n", 431),
    ],
    ids=[
        "no-token",
        "wrong-token",
        "longer-token",
        "empty-token",
        "body-over-cap",
        "bad-json",
        "bad-utf8",
        "not-an-object",
        "deeply-nested",
        "unknown-path",
        "dotdot-path",
        "garbage-line",
        "bad-header",
        "no-length",
        "negative-length",
        "chunked",
        "get",
        "long-line",
        "many-headers",
    ],
)
def test_bad_requests_get_their_status_and_the_proxy_keeps_serving(proxy, data, status):
    _, where = proxy
    got, body = raw_http(where, data)
    assert got == status
    assert "error" in json.loads(body)
    alive(where)


def test_deeply_nested_json_is_a_400_on_a_connection_that_goes_on(proxy):
    # json.loads raised RecursionError, which dropped the connection without an answer
    _, where = proxy
    if isinstance(where, str):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(where)
    else:
        s = socket.create_connection(where)
    with s:
        for depth in (1100, 2000):
            body = b'{"prompt":' + b"[" * depth + b"]" * depth + b"}"
            got, data = raw_http(s, request("/llm_query", body))
            assert got == 400
            assert json.loads(data) == {"error": "bad JSON: JSON nested too deeply"}
        got, data = raw_http(s, request("/llm_query", b'{"prompt":"same connection"}'))
        assert (got, json.loads(data)) == (200, {"response": "echo:same connection"})


@pytest.fixture
def big_proxy(echo_handler):
    """A proxy with the default body cap (64 MiB)."""
    state = ProxyState(token=TOKEN, lm_handler_address=echo_handler.address)
    p = ProxyServer(state, host="127.0.0.1")
    yield p, ("127.0.0.1", p.port)
    p.close()


def test_too_many_json_values_are_a_413_before_parsing(big_proxy):
    # "[]," is 3 bytes and a 64-byte list once parsed: 64 MiB of it was 1.5 GB of host RSS
    p, where = big_proxy
    body = b'{"prompt":"x","junk":[' + b"[]," * MAX_JSON_UNITS + b"[]]}"
    got, data = raw_http(where, request("/llm_query", body))
    assert got == 413
    assert f"more than {MAX_JSON_UNITS} JSON values" in json.loads(data)["error"]
    assert p.state.calls == 0
    alive(where)


def test_no_token_never_reaches_the_lm(tmp_path):
    client = ScriptedClient(lambda p: "answer")
    with LMHandler(client) as h:
        state = ProxyState(token=TOKEN, lm_handler_address=h.address)
        p = ProxyServer(state, host="127.0.0.1")
        try:
            for tok in (None, "x", TOKEN[:-1]):
                got, _ = raw_http(
                    ("127.0.0.1", p.port), request("/llm_query", b'{"prompt":"a"}', tok)
                )
                assert got == 401
            assert client.prompts == []
            assert state.calls == 0
        finally:
            p.close()


@pytest.mark.parametrize("seed", range(5))
def test_random_garbage_then_a_real_request(proxy, seed):
    _, where = proxy
    rnd = os.urandom(2000 + seed * 3000)
    try:
        raw_http(where, rnd, timeout=3)
    except (OSError, ValueError, IndexError):
        pass  # closed on us, or a non-HTTP answer: either way it must keep serving
    alive(where)


def test_slow_clients_do_not_starve_the_container(proxy, monkeypatch):
    """Slowloris: past MAX_CONNECTIONS, a new connection evicts the oldest silent one."""
    _, where = proxy
    socks = []
    try:
        for i in range(MAX_CONNECTIONS + 8):
            if isinstance(where, str):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(where)
            else:
                s = socket.create_connection(where)
            if i % 2:
                s.sendall(b"POST /llm_query HTTP/1.1\r\nHost: dribble")  # never finishes
            socks.append(s)
        alive(where)  # a fresh, honest connection is still served
        # the oldest silent ones were dropped: reading them gives EOF, not a hang
        socks[0].settimeout(5)  # < PREAUTH_TIMEOUT: only the eviction can end it this soon
        assert socks[0].recv(1) == b""
    finally:
        for s in socks:
            s.close()
    alive(where)


def _connect(where) -> socket.socket:
    if isinstance(where, str):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(where)
        return s
    return socket.create_connection(where)


def test_a_full_proxy_closes_its_oldest_idle_connection_for_a_new_one(proxy, monkeypatch):
    # before: past MAX_CONNECTIONS (256) a new connection was closed unanswered, while
    # idle kept-alive ones held their slots (and host threads and fds) for 300 s
    p, where = proxy
    monkeypatch.setattr(proxy_http, "MAX_CONNECTIONS", 6)
    held = []
    try:
        for _ in range(6):  # authenticated keep-alive connections, idle after one answer
            s = _connect(where)
            status, _ = raw_http(s, request("/llm_query", b'{"prompt":"k"}'))
            assert status == 200
            held.append(s)
        alive(where)  # the seventh is served: the oldest idle one made room
        held[0].settimeout(5)
        assert held[0].recv(1) == b""
        status, _ = raw_http(held[-1], request("/llm_query", b'{"prompt":"k"}'))
        assert status == 200  # the most recent ones are kept
    finally:
        for s in held:
            s.close()
    alive(where)


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_a_full_proxy_makes_a_new_connection_wait_until_one_is_free(tmp_path, monkeypatch, kind):
    gate = threading.Event()
    monkeypatch.setattr(proxy_http, "MAX_CONNECTIONS", 4)
    with LMHandler(ScriptedClient(lambda p: gate.wait(20) and f"ok:{p}")) as h:
        state = ProxyState(token=TOKEN, lm_handler_address=h.address)
        if kind == "tcp":
            p = ProxyServer(state, host="127.0.0.1")
            where: object = ("127.0.0.1", p.port)
        else:
            p = ProxyServer(state, unix_path=str(tmp_path / "p.sock"))
            where = str(tmp_path / "p.sock")
        try:
            answers: dict[int, tuple[int, bytes]] = {}

            def one(i: int) -> None:
                body = json.dumps({"prompt": f"p{i}"}).encode()
                answers[i] = raw_http(where, request("/llm_query", body), timeout=30)

            threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            assert answers == {}  # four busy, two waiting: none closed unanswered
            assert len(p.server._conns) == 4
            gate.set()
            for t in threads:
                t.join(30)
            assert sorted(answers) == list(range(6))
            for i, (status, data) in answers.items():
                assert status == 200 and json.loads(data) == {"response": f"ok:p{i}"}
        finally:
            gate.set()
            p.close()


def test_many_connections_at_once(proxy):
    _, where = proxy

    def one(i: int) -> None:
        assert ask(where, f"p{i}") == {"response": f"echo:p{i}"}

    assert run_threads(one, 100, timeout=30) == []
    alive(where)


def test_body_bytes_in_flight_are_capped(proxy, monkeypatch):
    _, where = proxy
    monkeypatch.setattr(proxy_http, "MAX_INFLIGHT_BODY", 100)
    body = json.dumps({"prompt": "x" * 200}).encode()
    got, data = raw_http(where, request("/llm_query", body))
    assert got == 503
    assert "error" in json.loads(data)
    alive(where)


def test_proxy_binds_only_the_host_it_was_given(echo_handler):
    p = ProxyServer(ProxyState(token=TOKEN), host="127.0.0.1")
    try:
        assert p.server.socket.getsockname()[0] == "127.0.0.1"
    finally:
        p.close()


# --------------------------------------------------------------------------- budgets
def test_call_budget(proxy):
    p, where = proxy
    p.state.max_llm_calls = 3
    answers = [ask(where, f"q{i}") for i in range(5)]
    assert [a.get("response") for a in answers[:3]] == ["echo:q0", "echo:q1", "echo:q2"]
    for a in answers[3:]:
        assert "budget exceeded" in a["error"]
    status, data = raw_http(
        where, request("/llm_query_batched", json.dumps({"prompts": ["a", "b"]}).encode())
    )
    assert status == 200
    assert all(r.startswith("Error: budget exceeded") for r in json.loads(data)["responses"])


def test_batch_partly_inside_the_call_budget(proxy):
    p, where = proxy
    p.state.max_llm_calls = 2
    body = json.dumps({"prompts": ["a", "b", "c", "d"]}).encode()
    status, data = raw_http(where, request("/llm_query_batched", body))
    out = json.loads(data)["responses"]
    assert out[:2] == ["echo:a", "echo:b"]
    assert all(r.startswith("Error: budget exceeded") for r in out[2:])
    assert p.state.calls == 2


def test_token_budget(proxy):
    p, where = proxy
    p.state.max_llm_tokens = 5  # EchoClient: words in + words out
    first = ask(where, "one two three")  # 3 in + 3 out = 6 tokens
    assert first == {"response": "echo:one two three"}
    second = ask(where, "more")
    assert "max_llm_tokens" in second["error"]
    assert p.state.tokens >= 6


def test_ledger_reserves_before_dispatch():
    """The ledger alone (no sockets): acquire_calls waits for room, release_calls settles."""
    state = ProxyState(token=TOKEN)
    assert state.acquire_calls(100, 0) == MAX_LM_INFLIGHT  # in flight, per session
    state.release_calls(MAX_LM_INFLIGHT, [])
    state.max_llm_tokens = 100
    state.calls = 0
    assert state.acquire_calls(5, 0) == 1  # no answer yet: one call finds out what one costs
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(state.acquire_calls(5, 0)))
    t.start()
    t.join(0.3)
    assert t.is_alive() and got == []  # it waits: it is not refused, nor let through
    state.tokens += 40  # what record() counts for the answer
    state.release_calls(1, [40])
    t.join(5)
    assert got == [2]  # 40 used + 40 reserved per call in flight: two fit under 100
    state.tokens += 70
    state.release_calls(2, [30, 40])
    assert state.acquire_calls(5, 0) == 0  # 110 >= 100: spent
    assert state.budget_message() == "budget exceeded: max_llm_tokens=100 used (110 tokens)"
    assert state.inflight == 0
    # a call waiting for room gives up when its cell is abandoned
    state.max_llm_tokens = None
    state.max_lm_inflight = 1
    assert state.acquire_calls(1, 3) == 1
    t = threading.Thread(target=lambda: got.append(state.acquire_calls(1, 3)))
    t.start()
    t.join(0.2)
    assert t.is_alive()
    state.abandon_through(3)
    t.join(5)
    assert got[-1] == -1


def test_concurrent_calls_cannot_overshoot_the_token_budget():
    # before: the budget was checked when a call was sent and tokens counted when its
    # answer came, so every call sent meanwhile passed: 100 threads with a 0.3 s LM,
    # max_llm_tokens=100 and 101 tokens a call made 100 LM calls (and the batch more)
    def slow(prompt):
        time.sleep(0.3)
        return " ".join(["word"] * 100)  # 1 token in + 100 out: one call's worth

    client = ScriptedClient(slow)
    with LMHandler(client) as h:
        state = ProxyState(token=TOKEN, lm_handler_address=h.address, max_llm_tokens=100)
        p = ProxyServer(state, host="127.0.0.1")
        where = ("127.0.0.1", p.port)
        try:
            answers: list[str] = []
            lock = threading.Lock()

            def one(i: int) -> None:
                if i == 0:
                    body = json.dumps({"prompts": [f"b{j}" for j in range(200)]}).encode()
                    status, data = raw_http(where, request("/llm_query_batched", body))
                    got = json.loads(data)["responses"]
                else:
                    d = ask(where, f"q{i}")
                    got = [d.get("response") or "Error: " + d["error"]]
                with lock:
                    answers.extend(got)

            assert run_threads(one, 100, timeout=50) == []
        finally:
            p.close()
    assert len(answers) == 299
    made = len(client.prompts)
    assert 1 <= made <= MAX_LM_INFLIGHT  # the documented bound
    assert sum(a.startswith("word") for a in answers) == made
    refused = [a for a in answers if not a.startswith("word")]
    assert refused and all(
        a.startswith("Error: budget exceeded: max_llm_tokens=100 used (") for a in refused
    )
    assert state.inflight == 0


def test_concurrent_calls_keep_to_the_call_budget(proxy):
    p, where = proxy
    p.state.max_llm_calls = 3
    answers = []
    assert run_threads(lambda i: answers.append(ask(where, f"q{i}")), 40, timeout=30) == []
    assert sum("response" in a for a in answers) == 3
    assert all(
        a["error"] == "budget exceeded: max_llm_calls=3 used" for a in answers if "error" in a
    )


# --------------------------------------------------------------------------- batch size
def test_a_batch_over_the_prompt_limit_is_a_413(big_proxy):
    p, where = big_proxy
    body = json.dumps({"prompts": ["p"] * (MAX_BATCH_PROMPTS + 1)}).encode()
    got, data = raw_http(where, request("/llm_query_batched", body))
    assert got == 413
    assert json.loads(data) == {
        "error": f"{MAX_BATCH_PROMPTS + 1} prompts in one batched call; at most "
        f"{MAX_BATCH_PROMPTS} are accepted (split the list)"
    }
    got, data = raw_http(where, request("/rlm_query_batched", body))
    assert got == 413
    assert p.state.calls == 0
    alive(where)


def test_a_batch_at_the_prompt_limit_is_served(big_proxy):
    p, where = big_proxy
    prompts = [f"p{i}" for i in range(MAX_BATCH_PROMPTS)]
    got, data = raw_http(
        where, request("/llm_query_batched", json.dumps({"prompts": prompts}).encode())
    )
    assert got == 200
    assert json.loads(data)["responses"] == [f"echo:{q}" for q in prompts]


def test_a_batch_with_the_budget_spent_dispatches_nothing(big_proxy, monkeypatch):
    p, where = big_proxy
    p.state.max_llm_calls = 1
    p.state.calls = 1

    def no_dispatch(*_a):
        raise AssertionError("no chunk should be dispatched")

    monkeypatch.setattr(p.routes, "run_windowed", no_dispatch)
    monkeypatch.setattr(p.routes, "pooled_lm_request", no_dispatch)
    body = json.dumps({"prompts": [0] * MAX_BATCH_PROMPTS}).encode()
    got, data = raw_http(where, request("/llm_query_batched", body))
    assert got == 200
    assert (
        json.loads(data)["responses"]
        == ["Error: budget exceeded: max_llm_calls=1 used"] * MAX_BATCH_PROMPTS
    )
    assert p.state.calls == 1


def test_a_million_prompt_batch_costs_the_host_little(big_proxy):
    # before: a chunk list, a future and an answer per prompt, then json.dumps of them
    # all (271 MB of host RSS and 2.6 s of CPU for 1,000,000 prompts, budget spent)
    p, where = big_proxy
    p.state.max_llm_calls = 0
    body = b'{"prompts":[' + b"0," * 999_999 + b"0]}"
    data = request("/llm_query_batched", body)
    tracemalloc.start()
    try:
        got, _ = raw_http(where, data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == 413
    assert peak < 3 * len(body) + (4 << 20)  # the body read and decoded, nothing per prompt


@pytest.fixture
def cell_client(big_proxy):
    """The in-container client (llm_query_batched of the bootstrap), aimed at the proxy."""
    boot = load_package("dockerrepl_bootstrap_client")
    p, where = big_proxy
    config = {"proxy": {"host": where[0], "port": where[1]}, "token": TOKEN, "depth": 1}
    boot.namespace.REPL.config.update(config)
    return boot.scaffold


def test_what_the_cell_sees_for_a_batch_over_the_limits(cell_client):
    n = MAX_BATCH_PROMPTS + 1
    out = cell_client.llm_query_batched(["p"] * n)
    assert (
        out
        == [
            f"Error: {n} prompts in one batched call; at most {MAX_BATCH_PROMPTS} are accepted "
            "(split the list)"
        ]
        * n
    )
    out = cell_client.llm_query_batched([0] * 2_000_000)
    assert len(out) == 2_000_000
    assert out[0] == out[-1]
    assert out[0].startswith(f"Error: the request holds more than {MAX_JSON_UNITS} JSON values")
    assert out[0].endswith(f"a batched call takes at most {MAX_BATCH_PROMPTS} prompts")
    assert cell_client.llm_query_batched(["a", "b"]) == ["echo:a", "echo:b"]


# --------------------------------------------------------------------------- abandoned cells
def test_abandoned_cell_gets_no_new_lm_work(proxy):
    p, where = proxy
    p.state.abandon_through(4)
    assert ask(where, "late", cell=4) == {"error": ABANDONED}
    assert ask(where, "next", cell=5) == {"response": "echo:next"}
    assert p.state.take(4) == []
    assert [c["response"] for c in p.state.take(5)] == ["echo:next"]


def test_batch_stops_dispatching_when_its_cell_is_abandoned():
    started = threading.Event()
    calls = []
    lock = threading.Lock()

    def slow(prompt):
        with lock:
            calls.append(prompt)
        started.set()
        time.sleep(0.05)
        return "ok"

    n = BATCH_CHUNK * (BATCH_WINDOW + 6)
    with LMHandler(ScriptedClient(slow), batch_max_concurrent=4) as h:
        state = ProxyState(token=TOKEN, lm_handler_address=h.address)
        p = ProxyServer(state, host="127.0.0.1")
        try:
            out: dict = {}

            def run() -> None:
                body = json.dumps({"prompts": [f"p{i}" for i in range(n)]}).encode()
                status, data = raw_http(
                    ("127.0.0.1", p.port),
                    request("/llm_query_batched", body, extra="X-DockerREPL-Cell: 7\r\n"),
                    timeout=60,
                )
                out["status"], out["data"] = status, data

            t = threading.Thread(target=run)
            t.start()
            assert started.wait(10)
            state.abandon_through(7)  # what the host does when cell 7 times out
            t.join(60)
            responses = json.loads(out["data"])["responses"]
            assert len(responses) == n
            assert f"Error: {ABANDONED}" in responses
            # what was already dispatched finished; nothing after the abandonment started
            assert len(calls) <= BATCH_CHUNK * (BATCH_WINDOW + 1)
            assert len(calls) < n
            assert state.take(7) == []  # and none of it is attributed
            assert state.calls == len(calls)
        finally:
            p.close()


def test_large_batch_keeps_order_across_chunks(proxy):
    _, where = proxy
    prompts = [f"x{i}" for i in range(BATCH_CHUNK * 3 + 5)]
    status, data = raw_http(
        where, request("/llm_query_batched", json.dumps({"prompts": prompts}).encode())
    )
    assert status == 200
    assert json.loads(data)["responses"] == [f"echo:{q}" for q in prompts]


# --------------------------------------------------------------------------- the LM Handler
def test_lm_handler_binds_loopback_by_default(echo_handler):
    assert echo_handler.address[0] == "127.0.0.1"
    assert echo_handler._server.socket.getsockname()[0] == "127.0.0.1"


def handler_alive(address) -> None:
    with socket.create_connection(address, timeout=10) as s:
        send_frame(s, {"prompt": "ping"})
        resp = recv_frame(s)
    assert resp["chat_completion"]["response"] == "echo:ping"


def test_lm_handler_four_gigabyte_prefix_closes_without_allocating(echo_handler):
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        with socket.create_connection(echo_handler.address, timeout=10) as s:
            s.sendall(HEADER.pack(0xFFFFFFFF) + b"{}")
            assert s.recv(1) == b""  # closed, no answer
        assert tracemalloc.get_traced_memory()[1] - base < 16 << 20
    finally:
        tracemalloc.stop()
    handler_alive(echo_handler.address)


def test_lm_handler_large_prefix_without_body_allocates_nothing(echo_handler):
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        with socket.create_connection(echo_handler.address, timeout=10) as s:
            s.sendall(HEADER.pack(200 << 20) + b'{"prompt":')  # under the cap, then silence
            time.sleep(0.3)
        time.sleep(0.3)
        assert tracemalloc.get_traced_memory()[1] - base < 16 << 20
    finally:
        tracemalloc.stop()
    handler_alive(echo_handler.address)


def test_lm_handler_bad_json_gets_an_error_frame_and_the_connection_lives(echo_handler):
    with socket.create_connection(echo_handler.address, timeout=10) as s:
        for body in (b"{nope", b"\xff\xfe", b"[]", b"42", b'{"prompts": 5}'):
            s.sendall(HEADER.pack(len(body)) + body)
            resp = recv_frame(s)
            assert resp["error"] and resp["chat_completion"] is None
        send_frame(s, {"prompt": "after"})
        assert recv_frame(s)["chat_completion"]["response"] == "echo:after"


@pytest.mark.parametrize("seed", range(5))
def test_lm_handler_survives_garbage(echo_handler, seed):
    with socket.create_connection(echo_handler.address, timeout=10) as s:
        try:
            s.sendall(os.urandom(1000 + seed * 1000))
            s.shutdown(socket.SHUT_WR)
            s.settimeout(5)
            while s.recv(65536):
                pass
        except OSError:
            pass  # the handler may close on us first (an oversized prefix)
    handler_alive(echo_handler.address)


def test_lm_handler_many_connections(echo_handler):
    socks = [socket.create_connection(echo_handler.address, timeout=10) for _ in range(100)]
    try:
        for i, s in enumerate(socks):
            s.sendall(encode_frame({"prompt": f"c{i}"}))
        for i, s in enumerate(socks):
            assert recv_frame(s)["chat_completion"]["response"] == f"echo:c{i}"
    finally:
        for s in socks:
            s.close()
    handler_alive(echo_handler.address)
