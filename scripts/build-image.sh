#!/usr/bin/env bash
# Build a Python image for dockerrepl WITHOUT a container registry.
#
# debootstrap fetches Debian packages (the only network this needs), and
# `docker import` turns the root filesystem into an image. The result is cached
# by tag: if the tag exists already, nothing is rebuilt (use --force).
#
# usage: scripts/build-image.sh [--tag TAG] [--packages "p1,p2"] [--force]
#   default tag:       dockerrepl/python:3.11-bookworm   (python3 only, no dill, no pip)
#   e.g. rlm's image:  scripts/build-image.sh --tag dockerrepl/rlm-python:bookworm \
#                        --packages python3-dill,python3-requests,python-is-python3
set -euo pipefail

tag="dockerrepl/python:3.11-bookworm"
extra=""
force=0
suite="${DOCKERREPL_SUITE:-bookworm}"
mirror="${DOCKERREPL_MIRROR:-http://deb.debian.org/debian}"
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag="$2"; shift 2 ;;
    --packages) extra="$2"; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

if [ "$force" = 0 ] && docker image inspect "$tag" >/dev/null 2>&1; then
  echo "image $tag already present"
  exit 0
fi

if ! command -v debootstrap >/dev/null 2>&1; then
  echo "installing debootstrap ..." >&2
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null
  else
    echo "debootstrap is missing: apt-get install debootstrap (as root)" >&2
    exit 1
  fi
fi

include="python3"
[ -n "$extra" ] && include="$include,$extra"
root="$(mktemp -d "${TMPDIR:-/tmp}/dockerrepl-rootfs.XXXXXX")"
trap 'rm -rf "$root"' EXIT
echo "debootstrap $suite (+ $include) into $root ..." >&2
debootstrap --variant=minbase --include="$include" "$suite" "$root" "$mirror" >"$root.log" 2>&1 || {
  tail -n 30 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
# Trim what a sandbox never needs: apt lists, docs, man pages, locales.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
       "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* 2>/dev/null || true
tar -C "$root" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' - "$tag" >/dev/null
echo "built $tag" >&2
