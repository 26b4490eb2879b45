# Sourced by scripts/demo.sh and scripts/test.sh: the Python they run with.
#
#   dr_python MODULE... -- PIP_ARGS...   PY = $PYTHON (default python3) when it can
#                                        import every MODULE, else dr_venv PIP_ARGS
#   dr_venv PIP_ARGS...                  PY = the project's virtual environment
#                                        ($DOCKERREPL_VENV, default <repo>/.venv), made
#                                        on first use, then `pip install PIP_ARGS` in it
#
# A virtual environment, not `pip install` into the interpreter itself: Debian's and
# Ubuntu's system python3 refuse that (PEP 668, "externally-managed-environment").

dr_base() {
  DR_BASE="${PYTHON:-python3}"
  if ! command -v "$DR_BASE" >/dev/null 2>&1; then
    echo "$(basename "$0"): no '$DR_BASE' on PATH: install Python 3.9+" \
      "(Debian/Ubuntu: apt-get install python3 python3-venv)" >&2
    exit 1
  fi
}

dr_venv() {
  dr_base
  local venv="${DOCKERREPL_VENV:-$ROOT/.venv}"
  if ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
    echo "$(basename "$0"): setting up a virtual environment in $venv" >&2
    rm -rf "$venv"
    if ! "$DR_BASE" -m venv "$venv" >/dev/null 2>&1; then
      rm -rf "$venv"
      # Debian and Ubuntu ship venv's ensurepip in a package of its own
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        local ver
        ver="$("$DR_BASE" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python$ver-venv" >/dev/null 2>&1 \
          || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        "$DR_BASE" -m venv "$venv"
      else
        echo "$(basename "$0"): '$DR_BASE -m venv' failed: install your distribution's venv" \
          "package (Debian/Ubuntu: sudo apt-get install python3-venv), or set PYTHON to a" \
          "Python that has dill" >&2
        exit 1
      fi
    fi
  fi
  PY="$venv/bin/python"
  if [ "$#" -gt 0 ]; then
    "$PY" -m pip install -q --disable-pip-version-check "$@" >&2
  fi
}

dr_python() {
  local want=() arg
  while [ "$#" -gt 0 ]; do
    arg="$1"; shift
    [ "$arg" = "--" ] && break
    want+=("$arg")
  done
  dr_base
  local imports
  imports="import $(IFS=,; echo "${want[*]}")"
  if "$DR_BASE" -c "$imports" >/dev/null 2>&1; then
    PY="$DR_BASE"
    return 0
  fi
  local venv="${DOCKERREPL_VENV:-$ROOT/.venv}"
  if "$venv/bin/python" -c "$imports" >/dev/null 2>&1; then
    PY="$venv/bin/python"
    return 0
  fi
  dr_venv "$@"
}
