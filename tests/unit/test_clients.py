"""EchoClient, ScriptedClient, and OpenAIClient against a local OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import socket
import threading
import types

import pytest
from concurrency import run_threads
from fake_openai import FakeOpenAI

from dockerrepl import clients
from dockerrepl.clients import EchoClient, OpenAIClient, ScriptedClient
from dockerrepl.errors import ClientError
from dockerrepl.types import ModelUsageSummary, UsageSummary

pytestmark = pytest.mark.timeout(30)


# --------------------------------------------------------------------------- echo / scripted
def test_echo_client():
    c = EchoClient()
    assert c.model_name == "echo"
    assert c.completion("hello world") == "echo:hello world"
    assert c.get_last_usage() == ModelUsageSummary(1, 2, 2)
    # a message list answers its last message's content
    assert c.completion([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == (
        "echo:b"
    )
    assert c.completion({"role": "user", "content": "d"}) == "echo:d"
    assert c.completion({"other": 1}).startswith("echo:")
    summary = c.get_usage_summary()
    assert isinstance(summary, UsageSummary)
    assert summary.model_usage_summaries["echo"].total_calls == 4
    assert EchoClient("custom").completion("x") == "echo:x"


def test_echo_acompletion():
    assert asyncio.run(EchoClient().acompletion("async")) == "echo:async"


def test_last_usage_is_per_thread():
    c = EchoClient()
    c.completion("one two three four")
    seen = []
    t = threading.Thread(target=lambda: seen.append(c.get_last_usage()))
    t.start()
    t.join()
    assert seen == [ModelUsageSummary()]  # nothing called on that thread
    assert c.get_last_usage().total_input_tokens == 4


def test_scripted_list_in_order_then_exhausted():
    c = ScriptedClient(["first", "second"])
    assert c.model_name == "scripted"
    assert c.completion("a") == "first"
    assert c.completion("b") == "second"
    with pytest.raises(ClientError):
        c.completion("c")
    assert c.prompts == ["a", "b", "c"]
    assert c.get_usage_summary().model_usage_summaries["scripted"].total_calls == 2


def test_scripted_function():
    c = ScriptedClient(lambda p: p.upper(), model_name="upper")
    assert c.completion("abc") == "ABC"
    assert c.completion("def") == "DEF"
    assert c.model_name == "upper"
    assert c.get_last_usage().total_calls == 1


def test_scripted_list_hands_each_answer_out_once_under_threads():
    c = ScriptedClient([str(i) for i in range(200)])
    got: list[str] = []
    lock = threading.Lock()

    def worker(_thread: int) -> None:
        for _ in range(50):
            a = c.completion("p")
            with lock:
                got.append(a)

    assert run_threads(worker, 4, timeout=20) == []
    assert sorted(got, key=int) == [str(i) for i in range(200)]


def test_scripted_function_error_propagates():
    def boom(prompt):
        raise ValueError("nope")

    with pytest.raises(ValueError):
        ScriptedClient(boom).completion("x")


# --------------------------------------------------------------------------- fake OpenAI server
@pytest.fixture
def fake():
    with FakeOpenAI() as f:
        yield f


@pytest.fixture
def sleeps(monkeypatch):
    """Record the client's backoff sleeps instead of sleeping."""
    delays: list[float] = []
    monkeypatch.setattr(clients, "time", types.SimpleNamespace(sleep=delays.append))
    return delays


@pytest.fixture(autouse=True)
def no_openai_env(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def test_request_shape(fake):
    c = OpenAIClient("gpt-test", base_url=fake.url + "/", api_key="sk-abc")
    assert c.completion("hello") == "fake answer"
    (req,) = fake.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["authorization"] == "Bearer sk-abc"
    assert req["headers"]["content-type"] == "application/json"
    assert req["body"]["model"] == "gpt-test"
    assert req["body"]["messages"] == [{"role": "user", "content": "hello"}]


def test_message_list_sent_as_is_and_extra_body(fake):
    c = OpenAIClient(
        "m",
        base_url=fake.url,
        api_key="k",
        extra_body={"temperature": 0},
        default_headers={"X-Test": "1"},
    )
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    c.completion(msgs)
    req = fake.requests[0]
    assert req["body"]["messages"] == msgs
    assert req["body"]["temperature"] == 0
    assert req["headers"]["x-test"] == "1"


def test_no_key_no_authorization_header(fake):
    c = OpenAIClient("m", base_url=fake.url)
    c.completion("x")
    assert "authorization" not in fake.requests[0]["headers"]


def test_usage_recorded(fake):
    fake.replies = [
        (200, {}, FakeOpenAI.completion("one", 10, 4)),
        (200, {}, FakeOpenAI.completion("two", 5, 1)),
    ]
    c = OpenAIClient("gpt-u", base_url=fake.url, api_key="k")
    assert c.completion("a") == "one"
    assert c.get_last_usage() == ModelUsageSummary(1, 10, 4)
    assert c.completion("b") == "two"
    assert c.get_last_usage() == ModelUsageSummary(1, 5, 1)
    s = c.get_usage_summary().model_usage_summaries["gpt-u"]
    assert (s.total_calls, s.total_input_tokens, s.total_output_tokens) == (2, 15, 5)


def test_null_content_is_empty_string(fake):
    body = FakeOpenAI.completion("x")
    body["choices"][0]["message"]["content"] = None
    fake.replies = [(200, {}, body)]
    assert OpenAIClient("m", base_url=fake.url).completion("x") == ""


def test_env_defaults_read_at_construction(fake, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    c = OpenAIClient("m")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-changed-later")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    assert c.base_url == fake.url
    c.completion("x")
    assert fake.requests[0]["headers"]["authorization"] == "Bearer sk-from-env"
    # explicit arguments win over the environment
    c2 = OpenAIClient("m", base_url=fake.url, api_key="explicit")
    c2.completion("y")
    assert fake.requests[1]["headers"]["authorization"] == "Bearer explicit"


def test_default_base_url():
    assert OpenAIClient("m").base_url == "https://api.openai.com/v1"


@pytest.mark.parametrize("status", [429, 500, 502, 503])
def test_retries_then_succeeds(fake, sleeps, status):
    fake.replies = [(status, {}, {"error": "busy"}), (status, {}, {"error": "busy"})]
    c = OpenAIClient("m", base_url=fake.url, max_retries=3, backoff=0.001, max_backoff=0.01)
    assert c.completion("x") == "fake answer"
    assert len(fake.requests) == 3
    assert len(sleeps) == 2
    assert all(0 < d <= 0.01 for d in sleeps)


def test_backoff_is_exponential_with_jitter(fake, sleeps):
    fake.replies = [(503, {}, {})] * 3
    c = OpenAIClient("m", base_url=fake.url, max_retries=3, backoff=1.0, max_backoff=30.0)
    c.completion("x")
    assert len(sleeps) == 3
    for attempt, d in enumerate(sleeps):
        assert 0.5 * 2**attempt <= d <= 2**attempt


def test_retry_after_honoured_and_capped(fake, sleeps):
    fake.replies = [
        (429, {"Retry-After": "7"}, {"error": "slow down"}),
        (429, {"Retry-After": "500"}, {"error": "slow down"}),
        (429, {"Retry-After": "soon"}, {"error": "unparseable header"}),
    ]
    c = OpenAIClient("m", base_url=fake.url, max_retries=5, backoff=0.001, max_backoff=20.0)
    assert c.completion("x") == "fake answer"
    assert sleeps[0] == 7.0
    assert sleeps[1] == 20.0  # capped by max_backoff
    assert sleeps[2] < 1.0  # an unparseable header falls back to backoff


def test_retries_exhausted(fake, sleeps):
    fake.replies = [(500, {}, {"error": "down"})] * 10
    c = OpenAIClient("m", base_url=fake.url, max_retries=2, backoff=0.001)
    with pytest.raises(ClientError) as info:
        c.completion("x")
    assert len(fake.requests) == 3
    assert len(sleeps) == 2
    assert "500" in str(info.value)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_no_retry_on_client_errors(fake, sleeps, status):
    fake.replies = [(status, {}, {"error": {"message": "bad"}})]
    c = OpenAIClient("m", base_url=fake.url, api_key="sk-secret-key", max_retries=3)
    with pytest.raises(ClientError) as info:
        c.completion("x")
    assert len(fake.requests) == 1
    assert sleeps == []
    assert str(status) in str(info.value)
    assert "sk-secret-key" not in str(info.value)


def test_connection_refused_retried_then_client_error(sleeps):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound but not listening: refused
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
        c = OpenAIClient("m", base_url=url, max_retries=2, backoff=0.001)
        with pytest.raises(ClientError):
            c.completion("x")
    assert len(sleeps) == 2


def test_timeout(fake, sleeps):
    fake.holding = True
    c = OpenAIClient("m", base_url=fake.url, timeout=0.3, max_retries=1, backoff=0.001)
    with pytest.raises(ClientError) as info:
        c.completion("x")
    assert "timed out" in str(info.value).lower()
    assert len(sleeps) == 1  # a timeout is retried like a connection error
    assert isinstance(info.value, ClientError)


def test_invalid_json_not_retried(fake, sleeps):
    fake.replies = [(200, {}, b"this is not json")]
    c = OpenAIClient("m", base_url=fake.url, max_retries=3)
    with pytest.raises(ClientError):
        c.completion("x")
    assert len(fake.requests) == 1
    assert sleeps == []


@pytest.mark.parametrize("body", [{}, {"choices": []}, {"choices": [{"text": "old api"}]}, []])
def test_response_without_a_message(fake, body):
    fake.replies = [(200, {}, body)]
    with pytest.raises(ClientError):
        OpenAIClient("m", base_url=fake.url).completion("x")


def test_repr_never_shows_the_key(monkeypatch):
    c = OpenAIClient("m", base_url="http://127.0.0.1:9/v1", api_key="sk-very-secret")
    assert "sk-very-secret" not in repr(c)
    assert "sk-very-secret" not in str(c)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env-secret")
    c2 = OpenAIClient("m")
    assert "sk-env-secret" not in repr(c2)
    assert "m" in repr(c2)


def test_works_behind_the_lm_handler(fake):
    from dockerrepl import LMHandler
    from dockerrepl.lm_handler import send_lm_request, send_lm_request_batched

    fake.replies = [(200, {}, FakeOpenAI.completion("via handler", 11, 2))]
    with LMHandler(OpenAIClient("gpt-h", base_url=fake.url, api_key="k")) as h:
        resp = send_lm_request(h.address, "q")
        c = resp["chat_completion"]
        assert c["response"] == "via handler"
        assert c["usage_summary"]["model_usage_summaries"]["gpt-h"] == {
            "total_calls": 1,
            "total_input_tokens": 11,
            "total_output_tokens": 2,
        }
        batch = send_lm_request_batched(h.address, ["a", "b", "c"])
    assert [c["response"] for c in batch["chat_completions"]] == ["fake answer"] * 3
    # each batched completion carries its own call's usage (per-thread last usage)
    for c in batch["chat_completions"]:
        assert c["usage_summary"]["model_usage_summaries"]["gpt-h"]["total_input_tokens"] == 7
