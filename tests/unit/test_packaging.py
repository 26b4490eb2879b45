"""Packaging rules (issue 2, part 1): importing does nothing, relative imports, vendorable."""

from __future__ import annotations

import ast
import configparser
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "dockerrepl"
BOOTSTRAP = PKG / "_bootstrap"


def package_sources() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def host_sources() -> list[Path]:
    """The modules that run on the host (the bootstrap runs in the container)."""
    return [p for p in package_sources() if "_bootstrap" not in p.parts]


def imported_modules(tree: ast.AST) -> list[tuple[str, int]]:
    """(module, level) for every import statement, nested ones included."""
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            out.append((node.module or "", node.level))
    return out


def run_py(code: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=str(cwd) if cwd else None,
        capture_output=True,
        text=True,
        timeout=45,
    )


def bare_env(**extra: str) -> dict[str, str]:
    """PATH="" and nothing else: no OPENAI_* vars, no DOCKER_HOST, no DOCKERREPL_*."""
    return {"PATH": "", **extra}


# --------------------------------------------------------------------------- static checks
def test_only_relative_imports_inside_the_package():
    offenders = []
    for path in host_sources():
        for mod, level in imported_modules(ast.parse(path.read_text("utf-8"))):
            if level == 0 and (mod == "dockerrepl" or mod.startswith("dockerrepl.")):
                offenders.append(f"{path.relative_to(ROOT)}: {mod}")
    assert offenders == []


def test_only_docker_module_imports_subprocess():
    users = []
    for path in host_sources():
        src = path.read_text("utf-8")
        mods = {m for m, level in imported_modules(ast.parse(src)) if level == 0}
        if "subprocess" in mods or "__import__('subprocess')" in src.replace('"', "'"):
            users.append(path.name)
    assert users == ["_docker.py"]


def test_grep_subprocess_finds_one_host_module():
    hits = sorted(p.name for p in host_sources() if "subprocess" in p.read_text("utf-8"))
    assert hits == ["_docker.py"]


def test_version_is_a_literal_and_matches_setup_cfg():
    tree = ast.parse((PKG / "_version.py").read_text("utf-8"))
    found = [
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    ]
    assert len(found) == 1
    import dockerrepl

    assert dockerrepl.__version__ == found[0]
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["version"].strip() == "attr: dockerrepl._version.__version__"


def test_nothing_takes_names_from_the_package_init():
    # `from . import __version__` runs the package __init__ first and ties the module to
    # it: the version lives in _version.py, and __init__ is the public surface only
    offenders = []
    for path in host_sources():
        rel = path.relative_to(PKG)
        if rel.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == len(rel.parts)
                and not node.module
            ):
                offenders += [
                    f"{rel}: {a.name}"
                    for a in node.names
                    if not (PKG / f"{a.name}.py").exists() and not (PKG / a.name).is_dir()
                ]
    assert offenders == []


def test_packaging_files_present():
    assert (PKG / "py.typed").is_file()
    assert (ROOT / "LICENSE").is_file()
    assert "MIT" in (ROOT / "LICENSE").read_text("utf-8")
    assert (ROOT / "pyproject.toml").is_file()
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["options"]["install_requires"].split() == ["dill"]
    assert cfg["options"]["python_requires"].strip() == ">=3.9"
    data = cfg["options.package_data"]["dockerrepl"]
    assert "py.typed" in data and "_bootstrap/*.py" in data


class _ImportTimeCode(ast.NodeVisitor):
    """Collects environment lookups in code that runs at import time.

    Module and class bodies run at import, as do decorators and default values;
    function bodies do not.
    """

    def __init__(self) -> None:
        self.hits: list[int] = []

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for expr in [*node.decorator_list, *node.args.defaults, *node.args.kw_defaults]:
            if expr is not None:
                self.visit(expr)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        for expr in [*node.args.defaults, *node.args.kw_defaults]:
            if expr is not None:
                self.visit(expr)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr in ("environ", "environb", "getenv", "getenvb"):
            self.hits.append(node.lineno)
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if node.id in ("environ", "getenv"):
            self.hits.append(node.lineno)


def test_no_importlib_metadata_and_no_import_time_env_reads():
    for path in host_sources():
        src = path.read_text("utf-8")
        assert "importlib.metadata" not in src, path.name
        assert "pkg_resources" not in src, path.name
        visitor = _ImportTimeCode()
        visitor.visit(ast.parse(src))
        assert visitor.hits == [], f"{path.name}: env read at import time, lines {visitor.hits}"


def test_all_is_sorted_and_names_exist():
    import dockerrepl

    assert list(dockerrepl.__all__) == sorted(dockerrepl.__all__)
    for name in dockerrepl.__all__:
        assert hasattr(dockerrepl, name), name


# --------------------------------------------------------------------------- import in a subprocess
# What the child records: threads, atexit callbacks, audit events (subprocess, fork,
# exec, sockets), and every read of os.environ made while `import dockerrepl` runs.
_PROBE = textwrap.dedent(
    """
    import atexit, json, os, sys, threading

    # import the stdlib modules dockerrepl needs first: what they do at import is
    # not ours to judge (and logging/concurrent.futures register atexit hooks)
    for name in json.loads(sys.argv[1]):
        __import__(name)

    events = []
    def hook(event, args):
        if event.startswith(("subprocess.", "os.system", "os.fork", "os.posix_spawn",
                             "os.exec", "os.spawn", "socket.", "_thread.start")):
            events.append(event)
    sys.addaudithook(hook)

    class Recorder(dict):
        seen = []
        def __getitem__(self, k):
            self.seen.append(k); return dict.__getitem__(self, k)
        def get(self, k, d=None):
            self.seen.append(k); return dict.get(self, k, d)
        def __contains__(self, k):
            self.seen.append(k); return dict.__contains__(self, k)
        def __iter__(self):
            self.seen.append("<iter>"); return dict.__iter__(self)
        def keys(self):
            self.seen.append("<keys>"); return dict.keys(self)
        def items(self):
            self.seen.append("<items>"); return dict.items(self)
        def copy(self):
            self.seen.append("<copy>"); return dict(self)

    real = os.environ
    os.environ = Recorder(real)
    before = atexit._ncallbacks()
    import dockerrepl, dockerrepl.clients, dockerrepl.lm_handler, dockerrepl.errors
    import dockerrepl.types, dockerrepl.repl, dockerrepl.pool, dockerrepl._proxy
    import dockerrepl._docker, dockerrepl._container, dockerrepl._wire
    os.environ = real
    print(json.dumps({
        "threads": threading.active_count(),
        "atexit": atexit._ncallbacks() - before,
        "events": events,
        "env_reads": [str(k) for k in Recorder.seen],
        "version": dockerrepl.__version__,
        "dill": "dill" in sys.modules,
    }))
    """
)

_STDLIB_OF = textwrap.dedent(
    """
    import json, sys
    before = set(sys.modules)
    import dockerrepl, dockerrepl.clients, dockerrepl.lm_handler, dockerrepl.errors
    import dockerrepl.types, dockerrepl.repl, dockerrepl.pool, dockerrepl._proxy
    import dockerrepl._docker, dockerrepl._container, dockerrepl._wire
    new = sorted(m for m in set(sys.modules) - before
                 if m.split(".")[0] != "dockerrepl" and not m.startswith("_frozen"))
    print(json.dumps(new))
    """
)


def test_import_does_nothing_but_define_names():
    env = bare_env(PYTHONPATH=str(ROOT))
    pre = run_py(_STDLIB_OF, env)
    assert pre.returncode == 0, pre.stderr
    stdlib = json.loads(pre.stdout)
    assert not any(m.split(".")[0] in ("dill", "rlm") for m in stdlib), stdlib
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(stdlib)],
        env=env,
        capture_output=True,
        text=True,
        timeout=45,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["threads"] == 1
    assert report["atexit"] == 0
    assert report["events"] == []
    assert report["env_reads"] == []
    assert report["dill"] is False  # dill is loaded only when a REPL needs it
    assert report["version"]


def test_import_with_empty_path_and_objects_usable():
    # the literal check, plus: building objects (not starting them) does nothing either
    code = (
        "import threading\n"
        "import dockerrepl\n"
        "from dockerrepl.clients import EchoClient\n"
        "h = dockerrepl.LMHandler(EchoClient())\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
        "print('ok')\n"
    )
    out = run_py(code, bare_env(PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# --------------------------------------------------------------------------- vendoring
_VENDORED = textwrap.dedent(
    """
    import importlib.abc, json, os, sys

    class Block(importlib.abc.MetaPathFinder):
        # the real package must not be reachable: a vendored copy stands alone
        def find_spec(self, name, path=None, target=None):
            if name == "dockerrepl" or name.startswith("dockerrepl."):
                raise ImportError("absolute import of " + name)
            return None
    sys.meta_path.insert(0, Block())

    import app._vendor.dockerrepl as d
    from app._vendor.dockerrepl import _staging
    from app._vendor.dockerrepl.clients import EchoClient
    from app._vendor.dockerrepl.lm_handler import send_lm_request

    with d.LMHandler(EchoClient()) as h:
        resp = send_lm_request(h.address, "hi")
    src = _staging._BOOTSTRAP_DIR
    print(json.dumps({
        "version": d.__version__,
        "bootstrap": src,
        "bootstrap_exists": os.path.isfile(os.path.join(src, "main.py")),
        "response": resp["chat_completion"]["response"],
        "error_is_own": issubclass(d.errors.ProtocolError, d.DockerReplError),
        "real_loaded": [m for m in sys.modules if m.split(".")[0] == "dockerrepl"],
    }))
    """
)


def test_vendored_under_another_name(tmp_path):
    vendor = tmp_path / "app" / "_vendor"
    vendor.mkdir(parents=True)
    (tmp_path / "app" / "__init__.py").write_text("")
    (vendor / "__init__.py").write_text("")
    shutil.copytree(PKG, vendor / "dockerrepl", ignore=shutil.ignore_patterns("__pycache__"))
    out = run_py(_VENDORED, bare_env(PYTHONPATH=str(tmp_path)), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["response"] == "echo:hi"
    assert report["bootstrap_exists"] is True
    # the bootstrap is found inside the vendored copy, not in the original checkout
    assert Path(report["bootstrap"]).resolve().is_relative_to(tmp_path.resolve())
    assert report["error_is_own"] is True
    assert report["real_loaded"] == []


def test_bootstrap_is_shipped_next_to_the_module_that_copies_it():
    from dockerrepl import _staging

    assert Path(_staging._BOOTSTRAP_DIR).resolve() == BOOTSTRAP.resolve()


def test_the_fitness_checks_see_the_subpackages():
    # the subprocess and import rules walk dockerrepl/ recursively: the CLI and the
    # proxy packages are host code like the rest (the bootstrap runs in the container)
    names = {p.relative_to(PKG).as_posix() for p in host_sources()}
    assert {"cli/gc.py", "cli/sandbox.py", "_proxy/routes.py", "_proxy/http.py"} <= names
    assert not any(n.startswith("_bootstrap/") for n in names)


def test_the_proxy_routes_know_nothing_of_http():
    # the routes answer parsed requests (path, body, cell): a second way in (frames over
    # the container's stdio) must be able to reach them without an HTTP object
    for name in ("ledger.py", "routes.py"):
        mods = {
            (m, level)
            for m, level in imported_modules(ast.parse((PKG / "_proxy" / name).read_text()))
        }
        assert not {m for m, level in mods if level == 0} & {"http", "socketserver", "hmac"}, name
        assert not {m for m, level in mods if level == 1} & {"http", "server"}, name


@pytest.mark.parametrize("package", ["_proxy", "cli"])
def test_the_split_packages_keep_modules_small(package):
    sizes = {p.name: len(p.read_text("utf-8").splitlines()) for p in (PKG / package).glob("*.py")}
    assert max(sizes.values()) <= 600, sizes


def test_bootstrap_imports_only_itself_and_the_host_only_its_protocol():
    """Imports flow host -> bootstrap, and only to the contract and the one tree
    removal both sides need (trees a cell built): the rest of the bootstrap is code
    for the container, staged, never imported on the host."""
    for path in sorted(BOOTSTRAP.glob("*.py")):
        for mod, level in imported_modules(ast.parse(path.read_text("utf-8"))):
            assert level in (0, 1), f"{path.name}: {mod}"
            assert not mod.startswith("dockerrepl"), f"{path.name}: {mod}"
    taken = set()
    for path in host_sources():
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.ImportFrom) and "_bootstrap" in (node.module or ""):
                taken.update(f"{node.module}:{alias.name}" for alias in node.names)
    # the contract; the loader (its text is the -c program); the workspace path walk,
    # which the host uses on a mount and the supervisor on a volume; the bounded repr of
    # locals, which the DSPy integration compares with the one it expects
    assert taken == {
        "_bootstrap.reprs:bounded_repr",
        "_bootstrap:protocol",
        "_bootstrap:loader",
        "_bootstrap.files:remove_tree",
        "_bootstrap.files:PathRefused",
        "_bootstrap.files:entry_mode",
        "_bootstrap.files:kind",
        "_bootstrap.files:open_dir_chain",
    }
