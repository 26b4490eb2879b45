"""Engine selection per REPL (issue #12): flags, option checks, Podman's differences.

No engine: a fake `docker` that prints its argv, and inspect output shaped as
Podman 4.3 gives it (captured from `podman inspect` on this machine).
"""

from __future__ import annotations

import os
import stat

import pytest

from dockerrepl import _container, _docker
from dockerrepl._container import Container, bridge_gateway
from dockerrepl._docker import Engine
from dockerrepl._options import ReplOptions
from dockerrepl._runspec import ContainerConfig
from dockerrepl.errors import DockerCommandError, SecurityCheckError, TransportUnavailable

pytestmark = pytest.mark.timeout(30)

# what `podman inspect` showed for --cap-drop ALL (its default set, one by one)
PODMAN_CAPDROP = [
    "CAP_AUDIT_WRITE", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_MKNOD", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW", "CAP_SETFCAP",
    "CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID", "CAP_SYS_CHROOT",
]  # fmt: skip
ZERO = "0000000000000000"
CLEAN_CAPS = {"CapInh": ZERO, "CapPrm": ZERO, "CapEff": ZERO, "CapBnd": ZERO, "CapAmb": ZERO}


def argv_printer(tmp_path, stdout: str = "", stderr: str = "", rc: int = 0) -> str:
    """A fake docker that prints each argument on its own line to a file, then ``stdout``."""
    path = tmp_path / "docker"
    path.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" >> {tmp_path / "argv.log"}\n'
        f"printf '%s' '{stdout}'\n"
        f"printf '%s' '{stderr}' >&2\n"
        f"exit {rc}\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def logged(tmp_path) -> list[str]:
    return (tmp_path / "argv.log").read_text().splitlines()


# ----------------------------------------------------------------- the flags
def test_engine_flags_for_docker_and_podman():
    assert Engine().flags() == []
    assert Engine("docker", host="tcp://h:2375").flags() == ["--host", "tcp://h:2375"]
    assert Engine("/usr/bin/docker", context="default").flags() == ["--context", "default"]
    assert Engine("podman", host="unix:///run/podman/podman.sock").flags() == [
        "--url",
        "unix:///run/podman/podman.sock",
    ]
    assert Engine("/usr/bin/podman", context="c1").flags() == ["--connection", "c1"]
    with pytest.raises(ValueError, match="mutually exclusive"):
        Engine(host="tcp://h:1", context="c")


@pytest.mark.parametrize(
    ("engine", "flags"),
    [
        (Engine(host="unix:///var/run/docker.sock"), ["--host", "unix:///var/run/docker.sock"]),
        (Engine(context="default"), ["--context", "default"]),
    ],
)
def test_every_entry_point_puts_the_flags_before_the_command(tmp_path, engine, flags):
    engine = Engine(argv_printer(tmp_path), engine.host, engine.context)
    _docker.run(["inspect", "c1"], timeout=10, docker=engine)
    _docker.stream(["pull", "img"], timeout=10, docker=engine, on_line=lambda _: None)
    proc = _docker.spawn(["run", "-i", "img"], docker=engine)
    assert proc.wait(10) == 0
    proc.close()
    lines = logged(tmp_path)
    assert lines == [*flags, "inspect", "c1", *flags, "pull", "img", *flags, "run", "-i", "img"]


def test_the_environment_is_not_changed(tmp_path, monkeypatch):
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    before = dict(os.environ)
    engine = Engine(argv_printer(tmp_path), host="tcp://10.9.9.9:2375")
    _docker.run(["version"], timeout=10, docker=engine)
    assert dict(os.environ) == before


def test_an_error_names_the_command_not_the_flags(tmp_path):
    docker = argv_printer(tmp_path, stderr="Error: something odd", rc=1)
    with pytest.raises(DockerCommandError) as info:
        _docker.run(["inspect", "c1"], timeout=10, docker=Engine(docker, host="tcp://h:1"))
    assert "`docker inspect c1`" in info.value.message


def test_the_container_config_carries_the_engine_to_run_inspect_and_rm(tmp_path):
    docker = argv_printer(tmp_path, stdout='[{"Id": "abc"}]')
    cfg = ContainerConfig(image="img", workspace=str(tmp_path), docker=Engine(docker, context="c9"))
    c = Container(cfg, str(tmp_path / "log"))
    c.inspect()
    c._remove(10)
    lines = logged(tmp_path)
    assert lines[:2] == ["--context", "c9"] and lines[2] == "inspect"
    assert lines[4:6] == ["--context", "c9"] and lines[6:8] == ["rm", "-f"]


# ------------------------------------------------------- the bridge gateway
def test_the_gateway_is_cached_per_engine_not_per_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(_container, "_GATEWAY_CACHE", {})
    script = tmp_path / "docker"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$2" >> {tmp_path / "calls"}\n'
        'case "$2" in tcp://a:1) echo \'[{"Gateway":"10.0.0.1"}]\';;'
        ' *) echo \'[{"Gateway":"10.0.0.2"}]\';; esac\n'
    )
    script.chmod(0o755)
    a, b = Engine(str(script), host="tcp://a:1"), Engine(str(script), host="tcp://b:1")
    monkeypatch.setenv("DOCKER_HOST", "tcp://a:1")
    assert bridge_gateway(a) == "10.0.0.1"
    assert bridge_gateway(b) == "10.0.0.2"
    monkeypatch.setenv("DOCKER_HOST", "tcp://b:1")  # the engine's flag decides, not this
    assert bridge_gateway(a) == "10.0.0.1"
    assert (tmp_path / "calls").read_text().split() == ["tcp://a:1", "tcp://b:1"]


def test_podman_with_the_bridge_fails_before_any_command(tmp_path):
    with pytest.raises(TransportUnavailable, match="network='none'"):
        bridge_gateway(Engine(str(tmp_path / "podman")))
    # podman behind a `docker` name: its own "network not found"
    docker = argv_printer(
        tmp_path,
        rc=125,
        stderr="Error: unable to find network with name or ID bridge: network not found",
    )
    with pytest.raises(TransportUnavailable):
        bridge_gateway(Engine(docker, host="unix:///run/podman/podman.sock"))


# ------------------------------------------------------------ option checks
@pytest.mark.parametrize(
    "url",
    ["unix:///var/run/docker.sock", "tcp://10.0.0.2:2375", "ssh://me@host", "npipe:////./pipe/x"],
)
def test_docker_host_urls_accepted(url):
    opts = ReplOptions.build(docker_host=url)
    assert opts.engine == Engine("docker", url, None)


@pytest.mark.parametrize(
    ("value", "exc"),
    [
        ("/var/run/docker.sock", ValueError),
        ("http://h:2375", ValueError),
        ("tcp://", ValueError),
        ("tcp://h:1 --privileged", ValueError),
        (2375, TypeError),
    ],
)
def test_docker_host_refused(value, exc):
    with pytest.raises(exc, match="docker_host"):
        ReplOptions.build(docker_host=value)


@pytest.mark.parametrize(
    ("value", "exc"), [("-H", ValueError), ("a b", ValueError), (1, TypeError)]
)
def test_context_refused(value, exc):
    with pytest.raises(exc, match="context"):
        ReplOptions.build(context=value)


def test_docker_host_and_context_are_exclusive():
    assert ReplOptions.build(context="default").engine == Engine("docker", None, "default")
    with pytest.raises(ValueError, match="mutually exclusive"):
        ReplOptions.build(docker_host="unix:///var/run/docker.sock", context="default")


def test_podman_bridge_needs_the_channel():
    """Podman gives our proxy no bridge: the proxy transport is refused before anything
    starts; "auto" (the default) and "channel" take the channel."""
    with pytest.raises(TransportUnavailable, match="transport='channel'"):
        ReplOptions.build(docker="podman", transport="proxy")
    with pytest.raises(TransportUnavailable):
        ReplOptions.build(docker="/usr/bin/podman", network="bridge", transport="proxy")
    assert ReplOptions.build(docker="podman").transport == "auto"
    assert ReplOptions.build(docker="podman", network="none", transport="proxy").engine.podman


def test_transport_is_checked():
    with pytest.raises(ValueError, match="transport must be one of 'auto', 'proxy', 'channel'"):
        ReplOptions.build(transport="stdio")
    with pytest.raises(TypeError, match="transport must be a str"):
        ReplOptions.build(transport=None)


def test_the_pool_checks_the_same_options():
    from dockerrepl import DockerREPLPool

    with pytest.raises(ValueError, match="mutually exclusive"):
        DockerREPLPool(size=1, docker_host="tcp://h:1", context="c")
    with pytest.raises(TransportUnavailable):
        DockerREPLPool(size=1, docker="podman", transport="proxy")


# ------------------------------------------------- verify() on Podman's inspect
def podman_attrs(**hc_changes):
    hc = {
        "CapDrop": list(PODMAN_CAPDROP),
        "CapAdd": [],
        "SecurityOpt": ["no-new-privileges"],
        "PidsLimit": 512,
        "Memory": 2 << 30,
        "MemorySwap": 2 << 30,
        "NanoCpus": 1_000_000_000,
        "ReadonlyRootfs": False,
        "Tmpfs": {},
        "NetworkMode": "none",
    }
    hc.update(hc_changes)
    return {"Id": "x", "HostConfig": hc, "Config": {}}


def podman_container(tmp_path, caps):
    cfg = ContainerConfig(image="img", workspace=str(tmp_path), docker="podman", network="none")
    c = Container(cfg, str(tmp_path / "log"))
    c.info = {"type": "ready"} if caps is None else {"type": "ready", "caps": caps}
    return c


def test_verify_accepts_podmans_list_when_the_container_reports_no_capabilities(tmp_path):
    podman_container(tmp_path, dict(CLEAN_CAPS)).verify(podman_attrs())


@pytest.mark.parametrize(
    ("caps", "hc", "what"),
    [
        (None, {}, "did not report"),  # no report: a list alone is not trusted
        ({**CLEAN_CAPS, "CapEff": "00000000a80425fb"}, {}, "CapEff"),
        ({**CLEAN_CAPS, "CapBnd": "0000000000000400"}, {}, "CapBnd"),
        ({k: v for k, v in CLEAN_CAPS.items() if k != "CapPrm"}, {}, "CapPrm"),
        (dict(CLEAN_CAPS), {"CapAdd": ["CAP_SYS_ADMIN"]}, "CapAdd"),
        (dict(CLEAN_CAPS), {"CapDrop": []}, "CapDrop"),
        (dict(CLEAN_CAPS), {"SecurityOpt": []}, "no-new-privileges"),
        (dict(CLEAN_CAPS), {"NetworkMode": "bridge"}, "NetworkMode"),
        (dict(CLEAN_CAPS), {"PidsLimit": 0}, "PidsLimit"),
    ],
)
def test_verify_fails_closed_on_a_tampered_podman_inspect(tmp_path, caps, hc, what):
    with pytest.raises(SecurityCheckError, match=what):
        podman_container(tmp_path, caps).verify(podman_attrs(**hc))


def test_verify_checks_the_report_on_docker_too(tmp_path):
    c = podman_container(tmp_path, {**CLEAN_CAPS, "CapEff": "0000000000000001"})
    with pytest.raises(SecurityCheckError, match="CapEff"):
        c.verify(podman_attrs(CapDrop=["ALL"]))
    podman_container(tmp_path, None).verify(podman_attrs(CapDrop=["ALL"]))  # older bootstrap


def test_the_bootstrap_reports_its_capability_sets():
    from dockerrepl._bootstrap.hardening import capability_sets

    caps = capability_sets()
    if caps is None:
        pytest.skip("no /proc here")
    assert set(caps) >= {"CapEff", "CapPrm", "CapBnd"}
    assert all(int(v, 16) >= 0 for v in caps.values())
