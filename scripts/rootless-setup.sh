#!/usr/bin/env bash
# Prepare this machine (as root) for rootless Docker and rootless Podman tests
# (tests/docker/rootless_engine.py). Idempotent: a second run changes nothing and
# takes well under a second. It does NOT start any daemon: the pytest fixture
# starts them as the user and stops them (by pid) when the session ends.
#
# usage: scripts/rootless-setup.sh [--user NAME] [--check]
#   --user NAME   the unprivileged user (default: $DOCKERREPL_ROOTLESS_USER or drrootless)
#   --check       change nothing; exit 1 and say what is missing
#
# What it does (each step only when needed), on Debian 12:
#   apt-get install rootlesskit uidmap slirp4netns fuse-overlayfs podman docker.io
#   useradd -m NAME, with a /etc/subuid and /etc/subgid range of 65536 ids
#   chmod 0666 /dev/net/tun        (slirp4netns opens it inside the user namespace;
#                                   udev makes it 0666, a machine without udev 0600:
#                                   "open: Permission denied")
#   sysctl user.max_user_namespaces / kernel.unprivileged_userns_clone if they forbid
#   /run/user/UID (XDG_RUNTIME_DIR, 0700, owned by NAME: no logind here to make it)
#   ~NAME/.config/containers/storage.conf  driver = "overlay" (Podman 4.3 picks vfs
#                                   without it here: 3 s per container instead of 0.2 s)
#   ~NAME/.config/dockerrepl/containers.conf  [containers] default_ulimits = []
#                                   (CONTAINERS_CONF for the user's podman; rootful
#                                   Podman needs it on this machine, rootless does not)
set -euo pipefail

user="${DOCKERREPL_ROOTLESS_USER:-drrootless}"
check=0
while [ $# -gt 0 ]; do
  case "$1" in
    --user) user="$2"; shift 2 ;;
    --check) check=1; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" != 0 ]; then
  echo "rootless-setup.sh must run as root (it creates a user and installs packages)" >&2
  exit 1
fi

missing=()
say() { echo "rootless-setup: $*" >&2; }
need() {  # need WHAT: in --check mode, record it and return 1 (skip the fix)
  if [ "$check" = 1 ]; then missing+=("$1"); return 1; fi
  say "$1"
  return 0
}

# ---- packages
pkgs=()
command -v rootlesskit >/dev/null 2>&1 || pkgs+=(rootlesskit)
command -v newuidmap >/dev/null 2>&1 || pkgs+=(uidmap)
command -v slirp4netns >/dev/null 2>&1 || pkgs+=(slirp4netns)
command -v fuse-overlayfs >/dev/null 2>&1 || pkgs+=(fuse-overlayfs)
command -v podman >/dev/null 2>&1 || pkgs+=(podman)
[ -x /usr/share/docker.io/contrib/dockerd-rootless.sh ] || command -v dockerd-rootless.sh >/dev/null 2>&1 \
  || pkgs+=(docker.io)
if [ ${#pkgs[@]} -gt 0 ] && need "apt-get install ${pkgs[*]}"; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi

# ---- the user and its subordinate ids
if ! id -u "$user" >/dev/null 2>&1; then
  if need "useradd -m $user"; then
    useradd -m -s /bin/bash "$user"
  fi
fi
if id -u "$user" >/dev/null 2>&1; then
  uid="$(id -u "$user")"
  home="$(getent passwd "$user" | cut -d: -f6)"
  for f in /etc/subuid /etc/subgid; do
    touch "$f"
    if ! grep -q "^$user:" "$f" && ! grep -q "^$uid:" "$f"; then
      # the next free range of 65536 after every range in either file (at least 100000)
      start="$(cat /etc/subuid /etc/subgid | awk -F: 'BEGIN{m=100000} NF==3{e=$2+$3; if(e>m)m=e} END{print m}')"
      if need "$f: $user:$start:65536"; then
        if [ "$f" = /etc/subuid ]; then
          usermod --add-subuids "$start-$((start + 65535))" "$user"
        else
          usermod --add-subgids "$start-$((start + 65535))" "$user"
        fi
      fi
    fi
  done
fi

# ---- kernel and devices
if [ -e /proc/sys/kernel/unprivileged_userns_clone ] \
  && [ "$(cat /proc/sys/kernel/unprivileged_userns_clone)" != 1 ]; then
  need "sysctl kernel.unprivileged_userns_clone=1" && sysctl -qw kernel.unprivileged_userns_clone=1
fi
if [ "$(sysctl -n user.max_user_namespaces 2>/dev/null || echo 0)" -lt 1000 ]; then
  need "sysctl user.max_user_namespaces=28633" && sysctl -qw user.max_user_namespaces=28633
fi
if [ ! -c /dev/net/tun ]; then
  need "mknod /dev/net/tun" && { mkdir -p /dev/net; mknod -m 0666 /dev/net/tun c 10 200; }
elif [ "$(stat -c %a /dev/net/tun)" != 666 ]; then
  need "chmod 0666 /dev/net/tun (was $(stat -c %a /dev/net/tun))" && chmod 0666 /dev/net/tun
fi

# ---- per-user directories and configuration
if id -u "$user" >/dev/null 2>&1; then
  run="/run/user/$uid"
  if [ ! -d "$run" ] || [ "$(stat -c %U:%a "$run")" != "$user:700" ]; then
    need "$run (XDG_RUNTIME_DIR)" && {
      mkdir -p "$run"; chown "$user:" "$run"; chmod 0700 "$run"; }
  fi
  storage="$home/.config/containers/storage.conf"
  if [ ! -f "$storage" ]; then
    need "$storage" && {
      install -d -o "$user" -g "$user" "$home/.config" "$home/.config/containers"
      printf '[storage]\ndriver = "overlay"\n' >"$storage"
      chown "$user:" "$storage"; }
  fi
  conf="$home/.config/dockerrepl/containers.conf"
  if [ ! -f "$conf" ]; then
    need "$conf" && {
      install -d -o "$user" -g "$user" "$home/.config" "$home/.config/dockerrepl"
      printf '[containers]\ndefault_ulimits = []\n' >"$conf"
      chown "$user:" "$conf"; }
  fi
fi

if [ "$check" = 1 ] && [ ${#missing[@]} -gt 0 ]; then
  printf 'rootless-setup: missing: %s\n' "${missing[@]}" >&2
  exit 1
fi
exit 0
