#!/usr/bin/env bash
# Container images of nstream-server (CPU) and nstream-operator, built by podman without a daemon
# (docs/operator.md, "Images").
#
#   scripts/images.sh build   # release binaries, then localhost/nstream-server:TAG and
#                             # localhost/nstream-operator:TAG in podman's own storage
#   scripts/images.sh base    # localhost/nstream-base:bookworm: a minimal Debian 12 made locally
#                             # with debootstrap, for machines that cannot pull a base image
#   scripts/images.sh check   # CI: images of the debug binaries on that local base; each image's
#                             # filesystem is exported and its binary started from it (chroot)
#
# The Dockerfiles in deploy/docker/ copy a binary built outside the image: the build context is a
# temporary folder holding only that binary. Environment:
#   NSTREAM_IMAGE_BASE     build's base image (default gcr.io/distroless/cc-debian12:nonroot, which
#                          needs a reachable registry; `local` builds and uses the debootstrap base)
#   NSTREAM_IMAGE_TAG      build's tag (default: the workspace version)
#   NSTREAM_IMAGE_PROFILE  build's cargo profile: release (default) or debug
#   NSTREAM_SKIP_IMAGES=1  check does nothing but say so (for machines without podman)
#   NSTREAM_DEBIAN_MIRROR  debootstrap's mirror (default http://deb.debian.org/debian)
#
# podman and debootstrap are installed with apt-get when missing and running as root; otherwise
# the script stops and names them. The base tarball and check's own podman storage are cached in
# ~/.cache/nstream/images (cold: a debootstrap download, a minute or two; warm: seconds; docs/operator.md).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

cache="${XDG_CACHE_HOME:-$HOME/.cache}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/nstream-target}"
images_cache="$cache/nstream/images"
suite=bookworm
base_image="localhost/nstream-base:$suite"
# Bump when the base's recipe below changes, so a cached tarball of the old recipe is not reused.
base_recipe=1
base_tarball="$images_cache/base-$suite-minbase-r$base_recipe.tar"
mirror="${NSTREAM_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
podman_options=()

die() {
  echo "images.sh: $*" >&2
  exit 1
}

# Installs the Debian package providing COMMAND when it is missing (as root with apt-get).
need() {
  local command=$1 package=$2
  command -v "$command" >/dev/null && return
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "== installing $package (apt-get)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$package" >&2 \
      || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$package" >&2; } \
      || die "could not install $package; install it (Debian: apt-get install $package) or set NSTREAM_SKIP_IMAGES=1"
  fi
  command -v "$command" >/dev/null \
    || die "$command not found; install $package (Debian: apt-get install $package) or set NSTREAM_SKIP_IMAGES=1"
}

pm() {
  podman "${podman_options[@]}" "$@"
}

# The base's root filesystem as a tarball, made once: debootstrap's minimal Debian plus what
# distroless/cc-debian12:nonroot also has (CA certificates, user and group 65532 `nonroot`), less
# package lists and documentation.
make_base_tarball() {
  [[ -s $base_tarball ]] && return
  need debootstrap debootstrap
  mkdir -p "$images_cache"
  local work started=$SECONDS
  work=$(mktemp -d "$images_cache/base.XXXXXX")
  echo "== debootstrap $suite ($mirror) into $work (once; cached as $base_tarball)" >&2
  if ! debootstrap --variant=minbase --include=ca-certificates "$suite" "$work/rootfs" "$mirror" \
    >"$work/debootstrap.log" 2>&1; then
    tail -n 30 "$work/debootstrap.log" >&2
    rm -rf "$work"
    die "debootstrap failed (log above)"
  fi
  local rootfs=$work/rootfs
  echo 'nonroot:x:65532:65532:nonroot:/home/nonroot:/usr/sbin/nologin' >>"$rootfs/etc/passwd"
  echo 'nonroot:x:65532:' >>"$rootfs/etc/group"
  install -d -o 65532 -g 65532 -m 0750 "$rootfs/home/nonroot"
  rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
  tar --numeric-owner -C "$rootfs" -cf "$work/base.tar" .
  mv "$work/base.tar" "$base_tarball"
  rm -rf "$work"
  echo "== base tarball made in $((SECONDS - started)) s ($(du -h "$base_tarball" | cut -f1))" >&2
}

ensure_base_image() {
  pm image exists "$base_image" && return
  make_base_tarball
  echo "== podman import $base_tarball as $base_image" >&2
  pm import --quiet --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "$base_tarball" "$base_image" >/dev/null
}

# build_image NAME BINARY BASE IMAGE: deploy/docker/<Dockerfile of NAME> around BINARY, tagged IMAGE.
build_image() {
  local name=$1 binary=$2 base=$3 image=$4 dockerfile context
  case $name in
    nstream-server) dockerfile=deploy/docker/server.Dockerfile ;;
    nstream-operator) dockerfile=deploy/docker/operator.Dockerfile ;;
    *) die "no Dockerfile for $name" ;;
  esac
  [[ -x $binary ]] || die "$binary is missing (cargo build did not make it?)"
  context=$(mktemp -d)
  # Debug information is not needed to run, and a debug build carries hundreds of MB of it.
  if [[ $binary == */debug/* ]] && command -v objcopy >/dev/null; then
    objcopy --strip-debug "$binary" "$context/$name"
  else
    cp "$binary" "$context/$name"
  fi
  # The operator's image also ships the router (deploy/router runs it from there), the server's
  # the command line (the operator's Distillation Jobs run `nstream distill` from it).
  local companion=
  [[ $name == nstream-operator ]] && companion=nstream-router
  [[ $name == nstream-server ]] && companion=nstream
  if [[ -n $companion ]]; then
    local path
    path="$(dirname "$binary")/$companion"
    [[ -x $path ]] || die "$path is missing (cargo build did not make it?)"
    if [[ $path == */debug/* ]] && command -v objcopy >/dev/null; then
      objcopy --strip-debug "$path" "$context/$companion"
    else
      cp "$path" "$context/$companion"
    fi
  fi
  local pull=missing
  [[ $base == localhost/* ]] && pull=never
  echo "== podman build $image (FROM $base)" >&2
  pm build --quiet --isolation chroot --pull="$pull" --build-arg "BASE=$base" -f "$repo/$dockerfile" \
    -t "$image" "$context" >/dev/null || { rm -rf "$context"; die "podman build of $image failed"; }
  rm -rf "$context"
}

workspace_version() {
  sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml
}

build() {
  need podman podman
  local profile=${NSTREAM_IMAGE_PROFILE:-release} tag=${NSTREAM_IMAGE_TAG:-$(workspace_version)}
  local base=${NSTREAM_IMAGE_BASE:-gcr.io/distroless/cc-debian12:nonroot}
  [[ $profile == release || $profile == debug ]] || die "NSTREAM_IMAGE_PROFILE must be release or debug, not $profile"
  if [[ $base == local ]]; then
    ensure_base_image
    base=$base_image
  fi
  local flags=(--locked -p nstream-server-bin -p nstream-operator-bin -p nstream-router-bin -p nstream)
  [[ $profile == release ]] && flags+=(--release)
  cargo build "${flags[@]}"
  for name in nstream-server nstream-operator; do
    build_image "$name" "$CARGO_TARGET_DIR/$profile/$name" "$base" "localhost/$name:$tag"
    echo "localhost/$name:$tag"
  done
}

# Runs a command inside an exported image filesystem as a container runtime would: chroot to it,
# change to the image's WorkingDir, drop to its User, and exec with its Env plus extras (a bare
# command name is looked up in the image's PATH). With $in_image_pidfile set, the process writes its
# pid there (it stays the command's pid: the helper execs it).
#   in_image ROOTFS IMAGE [NAME=VALUE...] -- COMMAND ARGS...
in_image_pidfile=
in_image() {
  local rootfs=$1 image=$2
  shift 2
  local env=()
  while [[ $1 != -- ]]; do
    env+=("$1")
    shift
  done
  shift
  local user workdir image_env
  user=$(pm image inspect --format '{{.Config.User}}' "$image")
  workdir=$(pm image inspect --format '{{.Config.WorkingDir}}' "$image")
  mapfile -t image_env < <(pm image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$image" | sed '/^$/d')
  python3 - "$in_image_pidfile" "$rootfs" "${user:-0}" "${workdir:-/}" "${image_env[@]}" "${env[@]}" -- "$@" <<'PY'
import os, sys

pidfile, root, user, workdir, *rest = sys.argv[1:]
if pidfile:
    with open(pidfile, "w") as file:
        file.write(str(os.getpid()))
split = rest.index("--")
settings, command = rest[:split], rest[split + 1:]
env = dict(setting.split("=", 1) for setting in settings)
uid, _, gid = user.partition(":")
os.chroot(root)
os.chdir(workdir)
os.setgroups([])
os.setgid(int(gid or uid))
os.setuid(int(uid))
os.execvpe(command[0], command, env)
PY
}

# Exports IMAGE's filesystem (through a created, never started, container) into FOLDER.
export_image() {
  local image=$1 folder=$2 container
  container=$(pm create "$image")
  mkdir -p "$folder"
  pm export "$container" | tar -x -C "$folder"
  pm rm "$container" >/dev/null
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

check() {
  if [[ ${NSTREAM_SKIP_IMAGES:-} == 1 ]]; then
    echo "NSTREAM_SKIP_IMAGES=1: the image check is skipped"
    return
  fi
  [[ $(id -u) == 0 ]] || die "check needs root (debootstrap, chroot); NSTREAM_SKIP_IMAGES=1 skips it"
  need podman podman
  need objcopy binutils
  need curl curl
  mkdir -p "$images_cache"
  # Its own storage, so the check neither reads nor leaves images in the machine's, and the base
  # stays imported between runs.
  podman_options=(--root "$images_cache/storage" --runroot "${TMPDIR:-/tmp}/nstream-images-run-$(id -u)")
  # One check at a time per cache (fd 9 is closed for the processes started below).
  exec 9>"$images_cache/lock"
  flock 9

  # The debug binaries `cargo test --workspace` builds (a no-op after it).
  cargo build --locked -p nstream-server-bin -p nstream-operator-bin -p nstream-router-bin -p nstream
  local started=$SECONDS
  ensure_base_image
  local server_image=localhost/nstream-server:check operator_image=localhost/nstream-operator:check
  build_image nstream-server "$CARGO_TARGET_DIR/debug/nstream-server" "$base_image" "$server_image"
  build_image nstream-operator "$CARGO_TARGET_DIR/debug/nstream-operator" "$base_image" "$operator_image"
  # The previous run's images, untagged by these builds.
  pm image prune --force >/dev/null

  work=$(mktemp -d "${TMPDIR:-/tmp}/nstream-images-check.XXXXXX")
  server_pid=
  trap 'if [[ -n $server_pid ]]; then kill "$server_pid" 2>/dev/null || true; fi; rm -rf "$work"' EXIT

  # The operator: its ENTRYPOINT, run from its own filesystem. LD_BIND_NOW makes the loader
  # resolve every symbol up front, so a library missing from the image fails here.
  export_image "$operator_image" "$work/operator"
  local entrypoint
  entrypoint=$(pm image inspect --format '{{index .Config.Entrypoint 0}}' "$operator_image")
  in_image "$work/operator" "$operator_image" LD_BIND_NOW=1 -- "$entrypoint" --help >"$work/operator.out" 9>&- \
    || die "nstream-operator --help failed in its image: $(cat "$work/operator.out")"
  grep -q -- '--server-image' "$work/operator.out" \
    || die "nstream-operator --help in its image printed: $(cat "$work/operator.out")"
  echo "== $operator_image: $entrypoint --help runs from the image's filesystem as user $(pm image inspect --format '{{.Config.User}}' "$operator_image")"
  # The router, from the same image, as deploy/router/deployment.yaml runs it.
  in_image "$work/operator" "$operator_image" LD_BIND_NOW=1 -- /usr/local/bin/nstream-router --help \
    >"$work/router.out" 9>&- || die "nstream-router --help failed in the operator image: $(cat "$work/router.out")"
  grep -q -- '--static-route' "$work/router.out" \
    || die "nstream-router --help in the operator image printed: $(cat "$work/router.out")"
  echo "== $operator_image: /usr/local/bin/nstream-router --help runs from the image's filesystem"

  # The server as the operator's Deployment runs it (crates/nstream-operator/src/desired.rs): the
  # bare command `nstream-server`, in WorkingDir, with the model file, secrets and Hugging Face
  # cache laid out under it as the pod's volumes, offline, as user 65532.
  export_image "$server_image" "$work/server"
  local pod_dir="$work/server/nstream" model=models--sentence-transformers--all-MiniLM-L6-v2
  local hub="${HF_HOME:-$cache/huggingface}/hub"
  [[ -d $hub/$model ]] || die "$hub/$model is missing (scripts/offline-models.sh lays it out)"
  mkdir -p "$pod_dir/config" "$pod_dir/secrets" "$pod_dir/cache/huggingface/hub"
  # The command line the Distillation Jobs run from this image (crates/nstream-operator/src/distillation.rs),
  # in its WorkingDir (a container runtime makes it; the exported filesystem has it only from here).
  in_image "$work/server" "$server_image" LD_BIND_NOW=1 -- nstream distill --help >"$work/distill.out" 9>&- \
    || die "nstream distill --help failed in the server image: $(cat "$work/distill.out")"
  grep -q -- '--stage' "$work/distill.out" \
    || die "nstream distill --help in the server image printed: $(cat "$work/distill.out")"
  echo "== $server_image: nstream distill --help runs from the image's filesystem"
  cp examples/all-minilm-l6-v2.yaml "$pod_dir/config/model.yaml"
  # A copy, not hard links: it is handed to user 65532 below, as fsGroup does in the pod.
  cp -a "$hub/$model" "$pod_dir/cache/huggingface/hub/"
  chown -R 65532:65532 "$pod_dir/cache"
  local port
  port=$(free_port)
  in_image_pidfile=$work/server.pid
  in_image "$work/server" "$server_image" NSTREAM_SECRETS_DIR=secrets HF_HOME=cache/huggingface HOME=/tmp \
    HF_HUB_OFFLINE=1 RAYON_NUM_THREADS=2 LD_BIND_NOW=1 -- \
    nstream-server --model-file config/model.yaml --host 127.0.0.1 --port "$port" --log-json \
    >"$work/server.log" 2>&1 9>&- &
  in_image_pidfile=
  local waited=0
  until [[ -s $work/server.pid ]]; do
    ((waited++ < 100)) || die "nstream-server did not start in its image: $(cat "$work/server.log")"
    sleep 0.1
  done
  server_pid=$(cat "$work/server.pid")
  local deadline=$((SECONDS + 180))
  until curl -fsS "http://127.0.0.1:$port/ready" >/dev/null 2>&1; do
    kill -0 "$server_pid" 2>/dev/null || die "nstream-server exited in its image: $(tail -n 20 "$work/server.log")"
    ((SECONDS < deadline)) || die "nstream-server not ready in 180 s: $(tail -n 20 "$work/server.log")"
    sleep 0.5
  done
  local response dimensions
  response=$(curl -sS "http://127.0.0.1:$port/v1/embeddings" -H 'content-type: application/json' \
    -d '{"model": "all-minilm-l6-v2", "input": "a container image that runs"}')
  dimensions=$(python3 -c 'import json, sys; print(len(json.load(sys.stdin)["data"][0]["embedding"]))' \
    <<<"$response" 2>/dev/null) || true
  [[ $dimensions == 384 ]] || die "the server in its image answered $response; its log: $(tail -n 20 "$work/server.log")"
  kill "$server_pid"
  wait || true
  server_pid=
  echo "== $server_image: nstream-server served a 384-dimension embedding from the image's filesystem as user 65532"
  echo "== images built and started in $((SECONDS - started)) s (after cargo build)"
}

case "${1:-}" in
  build) build ;;
  base)
    need podman podman
    ensure_base_image
    echo "$base_image"
    ;;
  check) check ;;
  *)
    echo "usage: $0 build|base|check" >&2
    exit 2
    ;;
esac
