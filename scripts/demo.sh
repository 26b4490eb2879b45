#!/usr/bin/env bash
# dockerrepl's main job, end to end, in one command:
#
#   1. start an LM Handler on 127.0.0.1: OpenAIClient when OPENAI_API_KEY or
#      OPENAI_BASE_URL is set (model: $DOCKERREPL_MODEL, default gpt-5-mini, as the
#      CLI), else EchoClient (answers "echo:<prompt>"); it says which;
#   2. open a DockerREPL on the default image (python:3.11-slim, or $DOCKERREPL_IMAGE);
#      when that image cannot be found or pulled, fall back to the offline image
#      dockerrepl/python:3.11-bookworm (built with scripts/build-image.sh if absent);
#   3. load a context (a built-in text, or --context FILE) and run cells that call
#      llm_query() and llm_query_batched() from inside the container;
#   4. print what came back, then clean up (also on errors and Ctrl-C).
#
# usage: scripts/demo.sh [--image IMAGE] [--context FILE]
# Works from a fresh clone on a machine with no Python packages: when $PYTHON
# (default python3) lacks dill, the script makes <repo>/.venv and installs dill there
# (once); the repository itself is put on PYTHONPATH.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export DOCKERREPL_ROOT="$ROOT"

case "${1:-}" in
  -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
esac

# shellcheck source=scripts/python-env.sh
. "$ROOT/scripts/python-env.sh"
dr_python dill -- dill

exec "$PY" - "$@" <<'PYTHON'
import argparse
import io
import os
import signal
import subprocess
import sys
import textwrap
import time

from dockerrepl import DockerREPL, LMHandler
from dockerrepl.cli.sandbox import make_client as cli_client
from dockerrepl.clients import OpenAIClient
from dockerrepl.errors import DockerReplError, NoSuchImage
from dockerrepl.repl import DEFAULT_IMAGE

ROOT = os.environ["DOCKERREPL_ROOT"]
OFFLINE_IMAGE = "dockerrepl/python:3.11-bookworm"

BOOK = textwrap.dedent(
    """\
    Chapter 1. The harbour town woke before the sun. Fishermen mended nets while the
    baker's oven filled the lanes with the smell of bread. Mara, the lighthouse
    keeper's daughter, counted the boats as they left: eleven, one fewer than the day
    before.

    Chapter 2. The missing boat belonged to old Tomas, who had not been seen since the
    storm. Mara rowed out past the breakwater, found his nets tangled on the reef, and
    a message in a bottle tied to the buoy: "Gone north to the seal islands. Back by
    the new moon."

    Chapter 3. The new moon came, and with it Tomas, sunburnt and laughing, his boat
    full of driftwood for the winter. The town held a feast on the quay, and Mara was
    given the first slice of bread from the baker's oven.
    """
)


def say(msg=""):
    print(msg, flush=True)


def make_client():
    # the same variables and default as `dockerrepl run/repl --backend auto`
    client, what = cli_client("auto", None, io.StringIO())
    if isinstance(client, OpenAIClient):
        say(f"LM client: OpenAIClient(model={client.model_name!r}, base_url={client.base_url!r})"
            " (OPENAI_API_KEY or OPENAI_BASE_URL is set)")
    else:
        say("LM client: EchoClient (answers 'echo:<prompt>'; set OPENAI_API_KEY to use a"
            " real model)")
    return client


def have_image(image):
    try:
        r = subprocess.run(["docker", "image", "inspect", image], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def open_repl(image, handler, context):
    kwargs = dict(lm_handler_address=handler.address, context_payload=context,
                  setup_code="import re", timeout=120)
    t0 = time.perf_counter()
    try:
        repl = DockerREPL(image=image, **kwargs)
    except NoSuchImage as exc:
        if image == OFFLINE_IMAGE:
            raise
        say(f"image: {image} cannot be found or pulled ({type(exc).__name__});"
            f" using the offline image {OFFLINE_IMAGE} instead")
        if not have_image(OFFLINE_IMAGE):
            say(f"       building it: scripts/build-image.sh --tag {OFFLINE_IMAGE} (a few minutes)")
            subprocess.run([os.path.join(ROOT, "scripts", "build-image.sh"), "--tag",
                            OFFLINE_IMAGE], check=True)
        image = OFFLINE_IMAGE
        t0 = time.perf_counter()
        repl = DockerREPL(image=image, **kwargs)
    say(f"image: {image} -> container {repl.container_id[:12]} ready in"
        f" {time.perf_counter() - t0:.2f}s (proxy port {repl.proxy_port})")
    return repl


def show(title, result):
    say(f"\n--- {title}  [{result.status}, {result.execution_time * 1000:.1f} ms,"
        f" {len(result.rlm_calls)} LM call(s)]")
    if result.stdout:
        say(textwrap.indent(result.stdout.rstrip("\n"), "  | "))
    if result.stderr:
        say(textwrap.indent(result.stderr.rstrip("\n"), "  ! "))
    if result.final_answer is not None:
        say(f"  final answer: {' '.join(result.final_answer.split())[:300]}")
    return result


def main():
    parser = argparse.ArgumentParser(prog="scripts/demo.sh")
    parser.add_argument("--image", default=os.environ.get("DOCKERREPL_IMAGE") or DEFAULT_IMAGE)
    parser.add_argument("--context", help="a text file to use as the context")
    args = parser.parse_args()
    context = BOOK
    if args.context:
        with open(args.context, encoding="utf-8", errors="replace") as f:
            context = f.read()
    # SIGTERM must unwind the with-blocks too, so the container is removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    client = make_client()
    with LMHandler(client) as handler:
        say(f"LM handler: listening on {handler.address[0]}:{handler.address[1]}")
        repl = open_repl(args.image, handler, context)
        with repl:
            say(f"context: {len(context)} characters, loaded as `context` in the REPL")
            cells = [
                ("look at the context",
                 "chapters = re.split(r'\\n\\s*\\n', context.strip())\n"
                 "print(f'{len(context)} chars, {len(chapters)} chapters,'\n"
                 "      f' {len(context.split())} words')"),
                ("llm_query: one question about the whole text",
                 "summary = llm_query('In one sentence, what happens in this story?\\n\\n'"
                 " + context)\n"
                 "print(' '.join(summary.split())[:150])"),
                ("llm_query_batched: one question per chapter, asked concurrently",
                 "titles = llm_query_batched(\n"
                 "    [f'Give a three-word title for this chapter:\\n{c}' for c in chapters])\n"
                 "for i, t in enumerate(titles, 1):\n"
                 "    print(f'chapter {i}:', ' '.join(t.split())[:100])"),
                ("state persists between cells; set the final answer",
                 "answer['content'] = f'{len(chapters)} chapters: ' + '; '.join(titles)\n"
                 "answer['ready'] = True\n"
                 "print(SHOW_VARS())"),
            ]
            calls = 0
            for title, code in cells:
                r = show(title, repl.execute_code(code))
                calls += len(r.rlm_calls)
                if r.status != "ok":
                    raise SystemExit(f"demo: the cell {title!r} did not succeed ({r.status})")
            usage = client.get_usage_summary().model_usage_summaries.get(client.model_name)
            say(f"\nLM calls made from the container: {calls}"
                + (f" ({usage.total_input_tokens} input / {usage.total_output_tokens} output"
                   " tokens)" if usage else ""))
            cid = repl.container_id
    say(f"cleaned up: container {cid[:12]} removed, LM handler stopped")
    return 0


try:
    sys.exit(main())
except DockerReplError as exc:
    hint = getattr(exc, "hint", "")
    print(f"demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    if hint and hint not in str(exc):
        print(f"hint: {hint}", file=sys.stderr)
    sys.exit(1)
except KeyboardInterrupt:
    print("demo interrupted; cleaned up", file=sys.stderr)
    sys.exit(130)
PYTHON
