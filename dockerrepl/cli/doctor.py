"""``dockerrepl doctor``: check, one line each, that dockerrepl can work on this machine.

Each check prints its name before it starts and its verdict (``ok``, ``FAIL``,
``skip``) with a detail when it ends, then a ``fix:`` line when it failed.
Checks that depend on a failed one are skipped. The exit status is 0 only
when every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import stat
import sys
import time
from collections.abc import Callable
from typing import IO, Any, Optional

from .. import _docker
from .._container import bridge_gateway
from .._docker import Engine
from .._labels import probe_labels
from .._runspec import CODE_MOUNT, PROXY_SOCKET
from .._version import __version__
from ..clients import EchoClient
from ..errors import DockerError, DockerReplError, DockerTimeout, NoSuchImage
from ..lm_handler import LMHandler
from ..repl import DockerREPL
from .options import default_image
from .sandbox import BUILD_HINT, check_image_name, ensure_image

__all__ = ["cmd_doctor"]

WIDTH = 44
#: Local images probed for a working Python when the asked-for image is missing.
MAX_PROBED = 3
FIREWALL_HINT = (
    "a firewall on the host may drop traffic from the docker bridge: allow it "
    "(e.g. `iptables -I INPUT -i docker0 -j ACCEPT` or `ufw allow in on docker0`), "
    "or use DockerREPL(network='none') / --network none (llm_query through a unix socket)"
)


class Fail(Exception):
    """A failed check: what was found and what to do."""

    def __init__(self, detail: str, fix: str = "") -> None:
        super().__init__(detail, fix)
        self.detail = detail
        self.fix = fix


class _Progress:
    """A stream for progress lines printed while a check's line is half written."""

    def __init__(self, doctor: Doctor) -> None:
        self.doctor = doctor

    def write(self, text: str) -> int:
        self.doctor.break_line()
        self.doctor.out.write("      " + text)
        return len(text)

    def flush(self) -> None:
        self.doctor.out.flush()


class Doctor:
    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.results: dict[str, Optional[bool]] = {}
        self._name = ""
        self._partial = False

    def break_line(self) -> None:
        if self._partial:
            self.out.write("\n")
            self._partial = False

    def not_applicable(self, name: str, why: str) -> None:
        """A check this engine cannot have: said, not counted as passed or failed."""
        self.out.write(f"{(name + ' ').ljust(WIDTH, '.')} n/a   {why}\n")

    def check(
        self, key: str, name: str, fn: Callable[[], str], needs: tuple[str, ...] = ()
    ) -> bool:
        label = (name + " ").ljust(WIDTH, ".") + " "
        missing = [n for n in needs if not self.results.get(n)]
        if missing:
            self.out.write(f"{label}skip  (needs: {', '.join(missing)})\n")
            self.results[key] = None
            return False
        self.out.write(label)
        self.out.flush()
        self._partial = True
        fix = ""
        try:
            detail, ok = fn(), True
        except Fail as exc:
            detail, fix, ok = exc.detail, exc.fix, False
        except DockerReplError as exc:
            detail = getattr(exc, "message", None) or str(exc)
            fix, ok = getattr(exc, "hint", "") or "", False
        if not self._partial:
            self.out.write(label)
        self._partial = False
        self.out.write(f"{'ok  ' if ok else 'FAIL'}  {detail}\n")
        if fix:
            self.out.write(f"      fix: {fix}\n")
        self.out.flush()
        self.results[key] = ok
        return ok


def _engine_endpoint(docker: Engine) -> str:
    host = docker.host or (None if docker.context else os.environ.get("DOCKER_HOST"))
    if host:
        return host
    try:
        res = _docker.run(
            ["context", "inspect", "--format", "{{.Endpoints.docker.Host}}"]
            + ([docker.context] if docker.context else []),
            timeout=15,
            docker=docker,
        )
        return res.stdout.strip() or "unix:///var/run/docker.sock"
    except DockerError:
        return "unix:///var/run/docker.sock"


def _socket_check(endpoint: str) -> str:
    if not endpoint.startswith("unix://"):
        return f"{endpoint} is not a local socket (bind mounts and host-gateway must reach here)"
    path = endpoint[len("unix://") :]
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise Fail(
            f"no socket at {path}",
            "start the engine (`sudo systemctl start docker` or `dockerd &`), "
            "or point DOCKER_HOST at the engine's socket",
        ) from None
    except OSError as exc:
        raise Fail(f"cannot stat {path}: {exc.strerror}", "check the directory's permissions")
    try:
        import grp
        import pwd

        owner = f"{pwd.getpwuid(st.st_uid).pw_name}:{grp.getgrgid(st.st_gid).gr_name}"
        group = grp.getgrgid(st.st_gid).gr_name
    except (ImportError, KeyError):
        owner, group = f"{st.st_uid}:{st.st_gid}", str(st.st_gid)
    mode = stat.filemode(st.st_mode)
    if not os.access(path, os.R_OK | os.W_OK):
        raise Fail(
            f"{path} ({mode} {owner}) is not read/writable by uid {os.geteuid()}",
            f"add your user to the '{group}' group (`sudo usermod -aG {group} $USER`, "
            "then log in again)",
        )
    return f"{path} ({mode} {owner}) is read/writable by uid {os.geteuid()}"


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:2])


def _python_in(image: str, docker: Engine) -> str:
    """Start a throw-away container and return its Python version and interpreter name."""
    probe = "import sys; print('%d.%d.%d' % sys.version_info[:3])"
    last = ""
    for python in ("python3", "python"):
        name = "dockerrepl-doctor-" + secrets.token_hex(4)
        argv = ["run", "--rm", "--name", name, "--network", "none", "--pull", "never"]
        for key, value in probe_labels().items():
            argv += ["--label", f"{key}={value}"]
        argv += ["--entrypoint", python, image, "-c", probe]
        try:
            res = _docker.run(argv, timeout=60, docker=docker, check=False)
        except DockerTimeout:
            _docker.run(["rm", "-f", name], timeout=20, docker=docker, check=False)
            raise
        if res.returncode == 0:
            version = res.stdout.strip()
            if _version_tuple(version) < (3, 8):
                raise Fail(
                    f"the image's {python} is Python {version}",
                    "dockerrepl needs Python 3.8+ in the image: choose another --image",
                )
            return f"{version} ({python})"
        err = res.stderr.strip()
        last = err.splitlines()[-1] if err else f"exit {res.returncode}"
        if res.returncode != 127 and "executable file not found" not in err:
            raise _docker.classify_error(err, res.returncode, ["docker", "run"])
    raise Fail(
        f"the image has neither python3 nor python ({last})",
        "dockerrepl needs Python 3.8+ in the image: choose another --image",
    )


def _ask(repl: DockerREPL, prompt: str) -> tuple[str, float]:
    t0 = time.perf_counter()
    res = repl.execute_code(f"print(llm_query({prompt!r}))")
    return (res.stdout + res.stderr).strip(), time.perf_counter() - t0


def cmd_doctor(args: argparse.Namespace) -> int:
    out = sys.stdout
    docker: Engine = args.engine
    image = args.image or default_image()
    check_image_name(image)  # a malformed name is about the name, before any check runs
    doc = Doctor(out)
    out.write(f"dockerrepl {__version__} doctor: image {image}\n")
    facts: dict[str, Any] = {}

    def cli() -> str:
        path = _docker.resolve_docker(docker.binary)
        res = _docker.run(["--version"], timeout=15, docker=docker)
        return f"{path} ({res.stdout.strip()})"

    def daemon() -> str:
        if docker.podman:
            # Podman (not remote) has no daemon: the CLI runs the containers itself
            res = _docker.run(["version", "--format", "{{json .}}"], timeout=30, docker=docker)
            try:
                both = json.loads(res.stdout) or {}
            except ValueError:
                both = {}
            facts["server"] = both.get("Server") or both.get("Client") or {}
            if docker.host or docker.context:
                return f"answers at {docker.host or docker.context}"
            return "podman runs containers itself (no daemon)"
        res = _docker.run(["version", "--format", "{{json .Server}}"], timeout=30, docker=docker)
        try:
            facts["server"] = json.loads(res.stdout) or {}
        except ValueError:
            facts["server"] = {}
        return f"answers at {_engine_endpoint(docker)}"

    def engine() -> str:
        server = facts.get("server") or {}
        version = str(server.get("Version") or "?")
        api = server.get("ApiVersion") or "?"
        os_name = next(
            (
                c.get("Details", {}).get("Os")
                for c in server.get("Components") or []
                if c.get("Name") == "Engine"
            ),
            None,
        )
        if docker.podman:
            if _version_tuple(version) < (4, 0):
                raise Fail(f"podman {version} is older than 4.0", "upgrade Podman to 4.0+")
            return f"podman {version}; network='none' only (docs/engines.md)"
        if os_name and os_name != "linux":
            raise Fail(f"engine {version} runs {os_name} containers", "switch to Linux containers")
        if _version_tuple(version) < (20, 10):
            raise Fail(
                f"engine {version} (API {api}) is older than 20.10",
                "upgrade Docker Engine to 20.10+ (needed for --add-host ...:host-gateway)",
            )
        return f"{version} (API {api}); host-gateway needs 20.10+"

    def image_check() -> str:
        try:
            how = ensure_image(image, docker, _Progress(doc))
        except NoSuchImage as exc:
            local = _local_python_images(docker)
            fix = BUILD_HINT + (
                f"; images here that run Python 3.8+: {', '.join(local)}" if local else ""
            )
            raise Fail(exc.message, fix) from None
        res = _docker.run(
            ["image", "inspect", "--format", "{{.Id}} {{.Size}}", image], timeout=30, docker=docker
        )
        ident, _, size = res.stdout.strip().partition(" ")
        mb = int(size) / 1e6 if size.isdigit() else 0
        return f"{image} {how} ({ident[7:19]}, {mb:.0f} MB)"

    def container() -> str:
        t0 = time.perf_counter()
        version = _python_in(image, docker)
        return f"Python {version} in a throw-away container, {time.perf_counter() - t0:.2f}s"

    handler = LMHandler(EchoClient())
    repls: dict[str, DockerREPL] = {}

    def open_repl(network: str) -> DockerREPL:
        if network in repls:
            return repls[network]
        handler.start()
        r = DockerREPL(
            image=image,
            lm_handler_address=handler.address,
            network=network,
            docker=docker.binary,
            docker_host=docker.host,
            context=docker.context,
            timeout=60,
            start_timeout=90,
        )
        repls[network] = r
        return r

    def route(r: DockerREPL) -> str:
        """Which way this REPL's llm_query went (``transport="auto"`` decided)."""
        if r.transport == "channel":
            why = r._session.fallback_reason
            return "the docker run -i pipe (transport channel" + (
                f"; the proxy path does not work here: {why[:200]})" if why else ")"
            )
        if r.network == "none":
            return f"{CODE_MOUNT}/{PROXY_SOCKET} (transport proxy)"
        return f"host.docker.internal -> {bridge_gateway(docker)}:{r.proxy_port} (transport proxy)"

    def transport() -> str:
        r = open_repl("bridge")
        answer, took = _ask(r, "doctor")
        if answer != "echo:doctor":
            raise Fail(f"llm_query() through {route(r)} gave {answer[-300:]!r}", FIREWALL_HINT)
        return f"llm_query() answered through {route(r)} in {took * 1000:.0f} ms"

    def dill() -> str:
        r = repls.get("bridge") or open_repl("none")
        res = r.execute_code("import dill\nprint(dill.__version__)\nprint(dill.__file__)")
        if res.status != "ok":
            raise Fail(
                f"import dill failed in the container: {res.stderr.strip()[-200:]}",
                "install dill on the host (`pip install dill`): it is sent with the bootstrap",
            )
        version, _, path = res.stdout.strip().partition("\n")
        source = "copied from the host" if path.startswith(CODE_MOUNT + "/") else "the image's"
        r.checkpoint()
        size = r.execute_code("import os\nprint(os.path.getsize('/workspace/state.dill'))")
        return f"dill {version} ({source}); checkpoint written ({size.stdout.strip()} bytes)"

    def no_network() -> str:
        r = open_repl("none")
        answer, took = _ask(r, "doctor")
        if answer != "echo:doctor":
            raise Fail(
                f"llm_query() through {route(r)} gave {answer[-300:]!r}",
                "the workspace directory must support unix sockets (not on some network "
                "filesystems): pass workspace_dir= on a local disk, or transport='channel'",
            )
        return f"llm_query() answered through {route(r)} in {took * 1000:.0f} ms"

    try:
        doc.check("cli", "docker CLI", cli)
        doc.check("daemon", "daemon reachable", daemon, ("cli",))
        if docker.podman and not (docker.host or docker.context):
            doc.not_applicable("permission on the engine socket", "podman needs no socket")
        elif doc.results.get("cli"):
            doc.check(
                "socket",
                "permission on the engine socket",
                lambda: _socket_check(_engine_endpoint(docker)),
            )
        else:
            doc.check("socket", "permission on the engine socket", lambda: "", ("cli",))
        doc.check("engine", "engine version", engine, ("daemon",))
        doc.check("image", "image present or pullable", image_check, ("engine",))
        doc.check("container", "a container starts", container, ("image",))
        doc.check("transport", "llm_query (transport auto)", transport, ("container",))
        doc.check("dill", "dill in the container", dill, ("container",))
        doc.check("unix", "network=none: llm_query", no_network, ("container",))
    finally:
        for r in repls.values():
            r.cleanup()
        handler.stop()
    failed = [k for k, v in doc.results.items() if v is False]
    skipped = [k for k, v in doc.results.items() if v is None]
    if failed or skipped:
        out.write(
            f"{len(failed)} of {len(doc.results)} checks failed"
            + (f", {len(skipped)} skipped" if skipped else "")
            + "\n"
        )
        return 1
    out.write(f"all {len(doc.results)} checks passed\n")
    return 0


def _local_python_images(docker: Engine) -> list[str]:
    """Local images that run Python 3.8+, to suggest when the asked-for one is missing.

    Only images with "python" in their name are candidates, and only those that
    :func:`_python_in` verified are returned; at most MAX_PROBED are probed (each
    within that check's timeout), so a long image list cannot stall the doctor.
    """
    try:
        res = _docker.run(
            ["images", "--format", "{{.Repository}}:{{.Tag}}"], timeout=30, docker=docker
        )
    except DockerReplError:
        return []
    names = [n for n in res.stdout.split() if "python" in n and not n.endswith(":<none>")]
    works = []
    for name in list(dict.fromkeys(names))[:MAX_PROBED]:
        try:
            _python_in(name, docker)
        except (Fail, DockerReplError):
            continue  # no Python 3.8+ there, or it does not start: not a fix
        works.append(name)
    return works
