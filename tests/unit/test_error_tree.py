"""The exception tree: shape, built-in bases, and pickle round trips."""

from __future__ import annotations

import inspect
import pickle

import pytest

from dockerrepl import errors
from dockerrepl.errors import (
    BootstrapError,
    CellTimeout,
    ClientError,
    ContainerDied,
    ContainerError,
    DockerCommandError,
    DockerDaemonError,
    DockerError,
    DockerNotFound,
    DockerPermissionError,
    DockerReplError,
    DockerTimeout,
    FrameTooLarge,
    LMHandlerError,
    NoSuchContainer,
    NoSuchImage,
    ProtocolError,
    ProxyError,
    ReplClosed,
    SecurityCheckError,
    SessionFileError,
    SetupCodeError,
    SnapshotLost,
    TransportUnavailable,
    WorkspacePathError,
)

pytestmark = pytest.mark.timeout(10)

ALL = [getattr(errors, name) for name in errors.__all__]

PARENT = {
    DockerError: DockerReplError,
    DockerNotFound: DockerError,
    DockerDaemonError: DockerError,
    DockerPermissionError: DockerError,
    NoSuchImage: DockerError,
    NoSuchContainer: DockerError,
    DockerTimeout: DockerError,
    DockerCommandError: DockerError,
    ContainerError: DockerReplError,
    BootstrapError: ContainerError,
    ContainerDied: ContainerError,
    SecurityCheckError: ContainerError,
    ProtocolError: DockerReplError,
    FrameTooLarge: ProtocolError,
    ProxyError: DockerReplError,
    TransportUnavailable: ProxyError,
    LMHandlerError: DockerReplError,
    ClientError: DockerReplError,
    ReplClosed: DockerReplError,
    SetupCodeError: DockerReplError,
    CellTimeout: DockerReplError,
    WorkspacePathError: DockerReplError,
    SessionFileError: DockerReplError,
    SnapshotLost: DockerReplError,
}


def test_every_exported_error_is_in_the_tree():
    assert set(ALL) == set(PARENT) | {DockerReplError}
    for cls in ALL:
        assert inspect.isclass(cls) and issubclass(cls, DockerReplError)
        assert issubclass(DockerReplError, Exception)


@pytest.mark.parametrize(("cls", "parent"), list(PARENT.items()), ids=lambda c: c.__name__)
def test_parent(cls, parent):
    assert issubclass(cls, parent)


def test_builtin_bases_where_the_meaning_matches():
    assert issubclass(DockerTimeout, TimeoutError)
    assert issubclass(CellTimeout, TimeoutError)
    assert issubclass(WorkspacePathError, ValueError)
    assert issubclass(SessionFileError, ValueError)
    # and only there: `except ValueError` must not swallow engine failures
    for cls in ALL:
        if cls not in (DockerTimeout, CellTimeout):
            assert not issubclass(cls, TimeoutError), cls
        if cls not in (WorkspacePathError, SessionFileError):
            assert not issubclass(cls, (ValueError, TypeError)), cls


def test_the_docstring_draws_the_whole_tree():
    doc = errors.__doc__ or ""
    for cls in ALL:
        assert cls.__name__ in doc


def _instance(cls):
    if issubclass(cls, DockerError):
        return cls("docker run failed", "do this", "stderr tail \u00e9", 125)
    return cls("something broke", 42)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_pickle_round_trip(cls):
    err = _instance(cls)
    for proto in range(2, pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(err, protocol=proto))
        assert type(back) is cls
        assert back.args == err.args
        assert str(back) == str(err)
        assert vars(back) == vars(err)


def test_docker_error_keeps_plain_data():
    err = NoSuchImage("image x missing", "scripts/build-image.sh", "manifest unknown", 125)
    assert (err.message, err.hint, err.stderr, err.returncode) == (
        "image x missing",
        "scripts/build-image.sh",
        "manifest unknown",
        125,
    )
    assert "scripts/build-image.sh" in str(err)
    assert str(DockerCommandError("plain")) == "plain"  # no hint, no decoration
    for value in vars(err).values():
        assert isinstance(value, (str, int))


def test_setup_code_error_keeps_the_traceback():
    tb = 'Traceback (most recent call last):\n  File "<cell>", line 1\nNameError: x\n'
    err = SetupCodeError("setup_code failed (NameError)", tb, "error")
    assert (err.traceback, err.status) == (tb, "error")
    assert tb in str(err)
    back = pickle.loads(pickle.dumps(err))
    assert (back.message, back.traceback, back.status) == (err.message, tb, "error")


def test_docker_timeout_caught_as_timeout_error():
    with pytest.raises(TimeoutError):
        raise DockerTimeout("slow", "check docker info")
    with pytest.raises(ValueError):
        raise WorkspacePathError("../etc")
