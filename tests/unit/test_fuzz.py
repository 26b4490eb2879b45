"""Hypothesis fuzzers (bounded) for everything that parses bytes from the other side.

* the frame parsers: ``dockerrepl._wire`` (LM Handler protocol), the host's
  parser of container frames (``Container._parse``) and the bootstrap's
  ``FrameReader`` (its ``protocol`` module, which the host imports too);
* the proxy's request handling, over real sockets to a real ``ProxyServer``;
* the LM Handler, over real sockets;
* the bootstrap's message handling: the supervisor run under the host Python,
  fed arbitrary messages on its stdin; after each one it must still answer a ping.

Each fuzzer only allows the documented outcomes (a value, a clean EOF, or the
documented error type) and checks that the server still serves afterwards.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
from bootstrap_process import Boot, hello
from docker_helpers import import_or_skip

hypothesis = import_or_skip("hypothesis", "the fuzz tests need hypothesis (the [test] extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dockerrepl import LMHandler  # noqa: E402
from dockerrepl._bootstrap import procs, protocol  # noqa: E402
from dockerrepl._container import Container  # noqa: E402
from dockerrepl._proxy import ProxyServer, ProxyState  # noqa: E402
from dockerrepl._runspec import ContainerConfig  # noqa: E402
from dockerrepl._wire import HEADER, decode_body, encode_frame, recv_frame  # noqa: E402
from dockerrepl.clients import EchoClient  # noqa: E402
from dockerrepl.errors import ProtocolError  # noqa: E402

pytestmark = pytest.mark.timeout(120)

TOKEN = "fuzz-token"
FAST = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
SLOW = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


# frames that are mostly well-formed, with garbage mixed in: reaches deeper than random bytes
frame_streams = st.lists(
    st.one_of(
        st.binary(max_size=64),
        json_values.map(lambda v: frame(json.dumps(v).encode())),
        st.binary(max_size=64).map(frame),
        st.integers(0, 0xFFFFFFFF).map(HEADER.pack),
        # nested past json's recursion limit (RecursionError, not ValueError)
        st.integers(990, 5000).map(lambda d: frame(b"[" * d + b"]" * d)),
    ),
    max_size=6,
).map(b"".join)


# --------------------------------------------------------------------------- frame parsers
@FAST
@given(data=frame_streams)
def test_wire_recv_frame_only_values_eof_or_protocol_error(data):
    a, b = socket.socketpair()
    try:
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        b.settimeout(5)
        for _ in range(10):
            try:
                value = recv_frame(b, max_size=1 << 16)
            except ProtocolError:
                break  # includes FrameTooLarge
            if value is None:
                break
            json.dumps(value)  # a decoded frame is plain JSON data
    finally:
        a.close()
        b.close()


@FAST
@given(value=json_values)
def test_wire_round_trip(value):
    data = encode_frame(value)
    (n,) = HEADER.unpack_from(data)
    assert n == len(data) - 4
    assert decode_body(data[4:]) == value


@FAST
@given(data=frame_streams, cut=st.integers(1, 16))
def test_host_parser_of_container_frames(tmp_path, data, cut):
    """Container._parse: a dict with a str 'type', None (need more), or ProtocolError."""
    config = ContainerConfig(image="x", workspace=str(tmp_path))
    c = Container(config, str(tmp_path / "log"), max_frame=1 << 16)
    c.kill = lambda: None  # type: ignore[method-assign]  # no process to kill here
    for i in range(0, len(data), cut):  # arriving in pieces
        c._frames.feed(data[i : i + cut])
        while True:
            try:
                msg = c._parse()
            except ProtocolError:
                return  # the REPL replaces the container on this
            if msg is None:
                break
            assert isinstance(msg, dict)
            assert isinstance(msg["type"], str)


def test_host_parser_refuses_a_deeply_nested_frame_and_reads_on(tmp_path):
    """RecursionError used to escape Container._parse (and every later execute_code)."""
    c = Container(ContainerConfig(image="x", workspace=str(tmp_path)), str(tmp_path / "log"))
    c.kill = lambda: None  # type: ignore[method-assign]
    deep = b'{"type":"result","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    c._frames.feed(frame(deep) + frame(b'{"type":"ready"}'))
    with pytest.raises(ProtocolError, match="nested too deeply"):
        c._parse()
    assert c._parse() == {"type": "ready"}


@FAST
@given(data=frame_streams, cut=st.integers(1, 16))
def test_bootstrap_frame_reader(data, cut):
    """FrameReader: frames, or ValueError/RecursionError (the supervisor kills the worker)."""
    reader = protocol.FrameReader(1 << 16)
    for i in range(0, len(data), cut):
        reader.feed(data[i : i + cut])
        try:
            frames = reader.frames()
        except (ValueError, RecursionError):
            return
        for f in frames:
            json.dumps(f)


# --------------------------------------------------------------------------- the proxy
@pytest.fixture(scope="module")
def echo_handler():
    with LMHandler(EchoClient()) as h:
        yield h


@pytest.fixture(scope="module")
def fuzz_proxy(echo_handler):
    p = ProxyServer(
        ProxyState(token=TOKEN, lm_handler_address=echo_handler.address),
        host="127.0.0.1",
        max_body=1 << 16,
    )
    yield p
    p.close()


def exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            out = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return out
                out += chunk
        except OSError:
            return b""  # reset: the proxy dropped us, which is allowed


def proxy_alive(port: int) -> None:
    body = b'{"prompt":"alive"}'
    data = (
        f"POST /llm_query HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    reply = exchange(port, data)
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert reply.endswith(b'{"response": "echo:alive"}')


header_lines = st.lists(
    st.one_of(
        st.sampled_from(
            [
                f"Authorization: Bearer {TOKEN}",
                "Authorization: Bearer nope",
                "Content-Length: 0",
                "Content-Length: 5",
                "Content-Length: -1",
                "Content-Length: 99999999",
                "Content-Length: x",
                "Transfer-Encoding: chunked",
                "Expect: 100-continue",
                "Connection: close",
                "X-DockerREPL-Cell: 3",
                "X-DockerREPL-Cell: -9",
            ]
        ),
        st.text(alphabet=st.characters(codec="latin-1"), max_size=30),
    ),
    max_size=5,
)


@SLOW
@given(
    method=st.sampled_from(["POST", "GET", "post", "", "POST POST"]),
    path=st.sampled_from(["/llm_query", "/llm_query_batched", "/rlm_query", "/host_tool", "/x"])
    | st.text(max_size=20),
    version=st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", ""]),
    headers=header_lines,
    body=st.binary(max_size=200)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.integers(990, 5000).map(lambda d: b'{"prompt":' + b"[" * d + b"]" * d + b"}"),
)
def test_proxy_request_handling(fuzz_proxy, method, path, version, headers, body):
    line = f"{method} {path} {version}\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n"
    reply = exchange(fuzz_proxy.port, line.encode("utf-8", "surrogateescape") + body)
    if reply:
        assert reply.startswith(b"HTTP/1.1 ")
        status = int(reply.split()[1])
        assert status in (100, 200, 400, 401, 403, 404, 405, 411, 413, 431, 503)
    proxy_alive(fuzz_proxy.port)


@SLOW
@given(data=st.binary(max_size=3000) | frame_streams)
def test_proxy_raw_bytes(fuzz_proxy, data):
    exchange(fuzz_proxy.port, data)
    proxy_alive(fuzz_proxy.port)


@SLOW
@given(data=frame_streams)
def test_lm_handler_raw_frames(echo_handler, data):
    with socket.create_connection(echo_handler.address, timeout=10) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while True:
                try:
                    resp = recv_frame(s)
                except ProtocolError:
                    break
                if resp is None:
                    break
                assert set(resp) == {"chat_completion", "chat_completions", "error"}
        except OSError:
            pass
    with socket.create_connection(echo_handler.address, timeout=10) as s:
        s.sendall(encode_frame({"prompt": "ok"}))
        assert recv_frame(s)["chat_completion"]["response"] == "echo:ok"


# --------------------------------------------------------------------------- the bootstrap
class Supervisor(Boot):
    """The bootstrap under the host Python (its sweep never runs outside a container)."""

    def __init__(self, tmp: Path) -> None:
        # stderr is not read: a pipe could fill up over a long run
        super().__init__(tmp, hello(grace=0.2), stderr=subprocess.DEVNULL)
        assert self.ready is not None and self.ready["type"] == "ready"

    def recv(self, timeout: float = 20.0) -> dict:
        msg = super().recv(timeout)
        assert msg is not None, f"the supervisor exited ({self.proc.poll()})"
        return msg

    def ping(self, n: int) -> None:
        self.send({"type": "ping", "id": f"ping-{n}"})
        while True:
            msg = self.recv()
            if msg.get("type") == "pong" and msg.get("id") == f"ping-{n}":
                # busy would mean a request is stuck: every fuzzed request got its answer
                assert msg["busy"] is False
                return


@pytest.fixture(scope="module")
def supervisor(tmp_path_factory):
    sup = Supervisor(tmp_path_factory.mktemp("fuzzboot"))
    yield sup
    sup.close()


OPS = ["load_file", "set_vars", "compaction", "reset_answer", "names", "nope", "restore"]
messages = st.fixed_dictionaries(
    {"type": st.sampled_from(["exec", "call", "ping", "interrupt", "bogus"]) | st.text(max_size=5)},
    optional={
        "id": json_values,
        "code": st.sampled_from(["x = 1", "print(1)", "1/0", "def f(:", ""]) | json_values,
        "op": st.sampled_from(OPS) | json_values,
        "args": json_values,
        "timeout": json_values,
        "stream": json_values,
    },
)
ANSWERS = {"result", "reply", "error", "pong"}


@SLOW
@given(msg=messages | json_values)
def test_supervisor_message_handling(supervisor, msg):
    """Any message gets its answer (or none, for interrupt) and the supervisor keeps going."""
    if isinstance(msg, dict) and msg.get("type") == "exec":
        msg["timeout"] = 5  # untrusted code strings are short; never let one hang the run
    supervisor.send(msg)
    kind = msg.get("type") if isinstance(msg, dict) else None
    if kind != "interrupt":
        while True:
            ans = supervisor.recv()
            assert ans.get("type") in ANSWERS | {"output", "progress"}
            if ans.get("type") in ANSWERS:
                break
    supervisor.ping(id(msg))


def test_sweep_never_runs_outside_a_container():
    """The supervisor's sweep kills every other process it can see: on a host, nothing."""
    assert procs.in_container() is False
    assert procs.sweep_processes() == []
