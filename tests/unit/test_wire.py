"""Length-prefixed JSON frames over real socketpairs."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import tracemalloc

import pytest

from dockerrepl import _wire
from dockerrepl._wire import (
    DEFAULT_MAX_FRAME,
    HEADER,
    MAX_JSON_UNITS,
    TooManyValues,
    decode_body,
    encode_frame,
    json_units,
    parse_json,
    recv_exact,
    recv_frame,
    send_frame,
)
from dockerrepl.errors import FrameTooLarge, ProtocolError

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize(
    "obj",
    [
        {},
        {"prompt": "hello", "depth": 1, "model": None},
        {"prompts": ["a", "b", {"role": "user", "content": "c"}]},
        [1, 2.5, None, True, "x"],
        "a plain string",
        {"nested": {"deep": [[[]]]}, "big": "x" * 100_000},
    ],
)
def test_round_trip(pair, obj):
    a, b = pair
    send_frame(a, obj)
    assert recv_frame(b) == obj


def test_header_is_four_byte_big_endian_length(pair):
    data = encode_frame({"k": "v"})
    (n,) = struct.unpack(">I", data[:4])
    assert HEADER.size == 4
    assert n == len(data) - 4
    assert json.loads(data[4:]) == {"k": "v"}


def test_several_frames_in_one_write(pair):
    a, b = pair
    a.sendall(b"".join(encode_frame({"i": i}) for i in range(5)))
    assert [recv_frame(b) for _ in range(5)] == [{"i": i} for i in range(5)]


def test_header_and_body_split_across_many_sends(pair):
    a, b = pair
    data = encode_frame({"prompt": "split me", "n": list(range(50))})

    def trickle():
        for i in range(len(data)):
            a.send(data[i : i + 1])
            if i < 8:
                time.sleep(0.002)  # let the reader see a partial header

    t = threading.Thread(target=trickle)
    t.start()
    try:
        assert recv_frame(b) == {"prompt": "split me", "n": list(range(50))}
    finally:
        t.join()


def test_clean_eof_on_boundary_is_none(pair):
    a, b = pair
    send_frame(a, {"last": True})
    a.shutdown(socket.SHUT_WR)
    assert recv_frame(b) == {"last": True}
    assert recv_frame(b) is None


def test_eof_mid_header_is_protocol_error(pair):
    a, b = pair
    a.sendall(b"\x00\x00")
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ProtocolError):
        recv_frame(b)


def test_eof_mid_body_is_protocol_error(pair):
    a, b = pair
    a.sendall(encode_frame({"prompt": "x" * 100})[:-10])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ProtocolError) as info:
        recv_frame(b)
    assert not isinstance(info.value, FrameTooLarge)


def test_eof_after_header_is_protocol_error(pair):
    a, b = pair
    a.sendall(HEADER.pack(10))
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ProtocolError):
        recv_frame(b)


def test_oversized_prefix_rejected_before_the_body_is_read(pair):
    a, b = pair
    # only the header is sent: reading the body would block until the socket timeout
    b.settimeout(5)
    a.sendall(HEADER.pack(11))
    with pytest.raises(FrameTooLarge):
        recv_frame(b, max_size=10)


def test_four_gigabyte_prefix_allocates_nothing(pair):
    a, b = pair
    a.sendall(b"\xff\xff\xff\xff")
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLarge):
            recv_frame(b)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000
    assert DEFAULT_MAX_FRAME < 0xFFFFFFFF


def test_limit_is_inclusive(pair):
    a, b = pair
    body = b'"abcdefgh"'
    a.sendall(HEADER.pack(len(body)) + body)
    assert recv_frame(b, max_size=len(body)) == "abcdefgh"


@pytest.mark.parametrize(
    "body",
    [b"\xff\xfe\xfd", b"{not json", b'{"a": 1', b"", b"\x00", b'"unterminated'],
)
def test_bad_utf8_or_json_is_protocol_error(pair, body):
    a, b = pair
    a.sendall(HEADER.pack(len(body)) + body)
    with pytest.raises(ProtocolError):
        recv_frame(b)
    with pytest.raises(ProtocolError):
        decode_body(body)


def test_stream_stays_aligned_after_a_bad_body(pair):
    a, b = pair
    a.sendall(HEADER.pack(3) + b"{{{" + encode_frame({"ok": 1}))
    with pytest.raises(ProtocolError):
        recv_frame(b)
    assert recv_frame(b) == {"ok": 1}


@pytest.mark.parametrize(
    "text",
    ["h\u00e9llo w\u00f6rld", "\u65e5\u672c\u8a9e", "emoji \U0001f600", "\x00\x01\x7f", "\u2028"],
)
def test_non_ascii_round_trip_as_utf8(pair, text):
    a, b = pair
    data = encode_frame({"t": text})
    if text.isprintable():
        assert text.encode("utf-8") in data  # UTF-8 on the wire, not \\u escapes
    a.sendall(data)
    assert recv_frame(b) == {"t": text}


def test_lone_surrogates_survive(pair):
    a, b = pair
    text = "bad \udcff byte and \ud800 high"
    send_frame(a, {"t": text})
    assert recv_frame(b) == {"t": text}


def test_non_serialisable_is_type_error():
    with pytest.raises(TypeError):
        encode_frame({"x": object()})


def test_recv_exact(pair):
    a, b = pair
    assert recv_exact(b, 0) == b""
    a.sendall(b"abc")
    assert recv_exact(b, 2) == b"ab"
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ProtocolError):
        recv_exact(b, 5)  # one byte left, then EOF
    assert recv_exact(b, 1) is None


# --------------------------------------------------------------------------- hostile JSON
DEEP = b'{"type":"result","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"


def test_deeply_nested_json_is_a_protocol_error_and_the_stream_stays_aligned(pair):
    # json.loads raises RecursionError here; it escaped decode_body, and on the host's
    # container channel it made every later execute_code raise RecursionError
    with pytest.raises(ProtocolError, match="nested too deeply"):
        decode_body(DEEP)
    a, b = pair
    a.sendall(HEADER.pack(len(DEEP)) + DEEP + encode_frame({"ok": 1}))
    with pytest.raises(ProtocolError):
        recv_frame(b)
    assert recv_frame(b) == {"ok": 1}


def test_memory_error_while_parsing_is_a_protocol_error(monkeypatch):
    def no_memory(*_a, **_k):
        raise MemoryError

    monkeypatch.setattr(_wire.json, "loads", no_memory)
    with pytest.raises(ProtocolError, match="out of memory"):
        decode_body(b'{"type":"x"}')


def test_too_many_values_are_refused_before_anything_is_parsed():
    # 3 bytes per empty list: json.loads would build ~64 bytes for each
    body = b"[" + b"[]," * MAX_JSON_UNITS + b"[]]"
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        with pytest.raises(ProtocolError, match="more than"):
            decode_body(body)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 2 * len(body) + (1 << 20)  # the text, not a list of a million lists
    with pytest.raises(TooManyValues):
        parse_json(body.decode())


def test_json_units_counts_structure_outside_strings_only():
    assert json_units("[]") == 1
    assert json_units('{"a": [1, 2], "b": {}}') == 7
    text = r'["a,b:c[d{e", "\\", "\"[,"]'
    assert json_units(text) == 9  # under the limit: an upper bound, strings included
    assert json_units(text, limit=3) == 3  # past it: "[" and two commas, outside strings
    assert json_units(text, limit=2) > 2
    # past the quick count, strings are skipped: CSV quoted in a prompt is one value
    csv = "\n".join("1,2,3,4,5,6,7,8,9,10" for _ in range(200_000))  # 1.8 million commas
    text = json.dumps({"prompt": csv})
    assert json_units(text) == 2
    assert parse_json(text)["prompt"].count(",") == 1_800_000
    with pytest.raises(ValueError):
        json_units('{"a": "unterminated, ' + "," * (MAX_JSON_UNITS + 1))


def test_an_honest_big_batch_is_well_inside_the_bound():
    # 10,000 prompts of 10 chat messages each (the proxy takes at most 10,000 prompts)
    batch = {
        "prompts": [
            [{"role": "user", "content": f"say {i}"} for i in range(10)] for _ in range(10_000)
        ],
        "model": None,
        "depth": 1,
    }
    units = json_units(json.dumps(batch))
    assert units == 510_006  # 51 per prompt, 6 around them
    assert units < 0.52 * MAX_JSON_UNITS
    assert parse_json(json.dumps(batch)) == batch


def test_public_names():
    for name in _wire.__all__:
        assert hasattr(_wire, name)
