"""Run by test_host_bounds.py in a process of its own, under a 1024 descriptor limit.

Session A's cell starts 256 threads that each call llm_query (a slow LM) and then
stay alive; afterwards session B, in the same process, runs the same cell. Prints
one JSON line: the host process's descriptor and thread counts (baseline, peak while
each cell ran, after each cell) and what each cell saw.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time

resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

from dockerrepl import DockerREPL, LMHandler  # noqa: E402
from dockerrepl.clients import ScriptedClient  # noqa: E402

CELL = """
import threading
out, ev = [], threading.Event()
def f(i):
    out.append(llm_query("hi %d" % i))
    ev.wait()  # the thread outlives its call, and its cell
ts = [threading.Thread(target=f, args=(i,), daemon=True) for i in range(256)]
for t in ts:
    t.start()
while len(out) < 256:
    time.sleep(0.05)
print(len(out), sum(o == "ok" for o in out), sorted(set(o for o in out if o != "ok"))[:3])
"""


def fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # EMFILE: listing needs a descriptor of its own
        return 1024


def threads() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


class Peak:
    def __init__(self) -> None:
        self.fds = self.threads = 0
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            self.fds, self.threads = max(self.fds, fds()), max(self.threads, threads())

    def done(self) -> tuple[int, int]:
        self.stop.set()
        self.t.join()
        return self.fds, self.threads - 1  # less the sampler itself


def session(image: str, address: object, out: dict, name: str) -> DockerREPL:
    peak = Peak()
    repl = DockerREPL(image=image, lm_handler_address=address, timeout=120)
    r = repl.execute_code("import time\n" + CELL)
    out[name] = {
        "status": r.status if hasattr(r, "status") else None,
        "stdout": r.stdout,
        "stderr": r.stderr[-2000:],
        "peak": peak.done(),
        "after": (fds(), threads()),
    }
    time.sleep(1.0)  # what stays once the cell's connections settle
    out[name]["after_1s"] = (fds(), threads())
    return repl


def main() -> None:
    image = sys.argv[1]
    out: dict = {}
    with LMHandler(ScriptedClient(lambda p: time.sleep(0.2) or "ok")) as handler:
        out["baseline"] = (fds(), threads())
        repls = []
        try:
            repls.append(session(image, handler.address, out, "A"))
            try:
                repls.append(session(image, handler.address, out, "B"))
            except Exception as exc:
                out["B_error"] = f"{type(exc).__name__}: {exc}"
        finally:
            for r in repls:
                r.cleanup()
        out["end"] = (fds(), threads())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
