"""The public API the integrations (DSPy, smolagents) are built on: ``define_tools()``,
``set_variables()`` and ``execute_code(value=True)``, on both transports."""

from __future__ import annotations

import subprocess
import time
from typing import Any

import pytest

from dockerrepl import DockerREPL, host_tool


def test_value_of_a_trailing_expression(any_transport_repl: Any) -> None:
    r = any_transport_repl
    res = r.execute_code("x = 41\nx + 1", value=True)
    assert (res.status, res.value, res.value_is_repr, res.stdout) == ("ok", 42, False, "")
    assert r.execute_code("x + 1").value is None  # only when asked
    assert r.execute_code("y = 1", value=True).value is None  # no trailing expression
    res = r.execute_code("(1, {'a': [2.5, None]}), {3}", value=True)
    assert res.value == "((1, {'a': [2.5, None]}), {3})" and res.value_is_repr
    res = r.execute_code("print('p')\n[1, (2, 3)]", value=True)
    assert (res.value, res.value_is_repr, res.stdout) == ([1, [2, 3]], False, "p\n")
    res = r.execute_code("1 / 0", value=True)
    assert (res.status, res.value) == ("error", None)
    # line numbers in tracebacks are the cell's own
    res = r.execute_code("a = 1\n\nundefined_name", value=True)
    assert "line 3" in res.stderr and res.exception == "NameError"
    # the rlm shape of to_dict() is unchanged
    assert set(res.to_dict()) == {
        "stdout",
        "stderr",
        "locals",
        "execution_time",
        "rlm_calls",
        "final_answer",
    }
    with pytest.raises(TypeError):
        r.execute_code("1", value=1)


def test_a_value_is_bounded_like_output(image: str) -> None:
    with DockerREPL(image=image, max_output_bytes=1000, timeout=60) as r:
        res = r.execute_code("'x' * 5000", value=True)
        assert res.value_is_repr and len(res.value) < 1200
        assert res.output_truncated["value"] >= 3000
        res = r.execute_code("list(range(2000))", value=True)
        assert res.value_is_repr and "dropped" in res.value
        assert r.execute_code("list(range(10))", value=True).value == list(range(10))

        res = r.execute_code(
            "class B:\n    def __repr__(self):\n        raise ValueError('no')\nB()", value=True
        )
        assert res.status == "ok" and res.value_is_repr and "repr failed" in res.value


def test_define_tools_after_start(any_transport_repl: Any) -> None:
    r = any_transport_repl
    seen: list[tuple[Any, ...]] = []

    def add(left: int, right: int) -> int:
        seen.append((left, right))
        return left + right

    r.define_tools({"add": host_tool(add), "k": 5, "sq": "lambda v: v * v"})
    assert r.execute_code("add(19, right=23), k, sq(3)", value=True).value == [42, 5, 9]
    assert seen == [(19, 23)]
    # a callable tool comes back after the code overwrites it; a replaced one does not
    assert r.execute_code("add = None\nadd(1, 1)", value=True).status == "error"
    assert r.execute_code("add(1, 1)", value=True).value == 2
    r.define_tools({"add": "def add(a, b):\n    return a * b"})
    assert r.execute_code("add(3, 4)", value=True).value == 12
    r.define_tools({"add": 7})
    assert r.execute_code("add", value=True).value == 7
    # the LM helpers may be taken over by a host tool (DSPy's own llm_query), nothing else
    r.define_tools({"llm_query": host_tool(lambda prompt, model=None: "host:" + prompt)})
    assert r.execute_code("llm_query('hi')", value=True).value == "host:hi"
    with pytest.raises(ValueError, match="reserved"):
        r.define_tools({"llm_query": "def llm_query(p):\n    return p"})
    with pytest.raises(ValueError, match="reserved"):
        r.define_tools({"answer": host_tool(len)})
    with pytest.raises(ValueError, match="identifier"):
        r.define_tools({"not a name": 1})


def test_defined_tools_survive_a_new_container(image: str) -> None:
    with DockerREPL(image=image, timeout=60, transport="proxy") as r:
        r.define_tools({"one": host_tool(lambda: 1)})
        r.define_tools({"two": "def two():\n    return 2"})
        r.execute_code("kept = 3")
        time.sleep(0.3)  # the background snapshot
        subprocess.run(["docker", "kill", r.container_id], capture_output=True, check=False)
        res = r.execute_code("one() + two() + kept", value=True)
        assert res.value == 6, res.stderr
        assert r.restarts == 1
        # and a killed worker (a new process in the same container)
        res = r.execute_code("import os\nos._exit(1)")
        assert res.status == "crashed"
        assert r.execute_code("one() + two()", value=True).value == 3


def test_set_variables(any_transport_repl: Any) -> None:
    r = any_transport_repl
    big = "z" * 200_000
    r.set_variables({"small": [1, 2], "big": big, "table": {"k": list(range(20000))}})
    res = r.execute_code("len(small), len(big), len(table['k'])", value=True)
    assert res.value == [2, 200_000, 20000]
    # large values travel as workspace files, not in the frame
    assert r.execute_code("import os\nos.path.exists('_var_big.txt')", value=True).value
    with pytest.raises(TypeError, match="JSON"):
        r.set_variables({"bad": object()})
    with pytest.raises(ValueError, match="reserved"):
        r.set_variables({"llm_query": 1})
    with pytest.raises(ValueError, match="identifier"):
        r.set_variables({"1x": 1})
