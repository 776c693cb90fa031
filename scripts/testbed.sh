#!/usr/bin/env bash
# A real Kubernetes control plane on loopback, for trying the operator and for its end-to-end
# tests: etcd + kube-apiserver + kube-controller-manager, built from Go modules the first time
# (pins in tools/kube-testbed/) and cached outside the repo. No kubelet: pods are never run.
#
#   scripts/testbed.sh build   build the three binaries once (cold: 10-20 min on 2 cores)
#   scripts/testbed.sh up      build if needed, start, install the CRDs, print `export KUBECONFIG=...`
#   scripts/testbed.sh down    stop what `up` started (by pid) and delete its state
#   scripts/testbed.sh bin-dir print the folder holding the binaries (for tests: NSTREAM_TESTBED_BIN)
#
#   eval "$(scripts/testbed.sh up)"; kubectl get crds   # or any Kubernetes client
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

KUBE_VERSION=1.34.4 # matches k8s-openapi's v1_34 feature in the workspace Cargo.toml
ETCD_VERSION=3.6.4  # the etcd that Kubernetes 1.34.4 pins
cache="${XDG_CACHE_HOME:-$HOME/.cache}/nstream/kube-testbed"
# The pins' hash is part of the folder name: changed pins build new binaries.
pins="$(cat "$root"/tools/kube-testbed/*/go.sum "$root"/tools/kube-testbed/*/go.mod | sha256sum | cut -c1-12)"
bin="$cache/k8s-$KUBE_VERSION-etcd-$ETCD_VERSION-$pins"
state="${NSTREAM_TESTBED_DIR:-$cache/run}"
export PATH="$PATH:/usr/local/go/bin"

log() { echo "testbed: $*" >&2; }

build() {
  if [[ -x "$bin/kube-apiserver" && -x "$bin/kube-controller-manager" && -x "$bin/etcd" ]]; then
    return 0
  fi
  command -v go >/dev/null || { log "Go is needed to build the testbed (https://go.dev/dl)"; exit 1; }
  mkdir -p "$bin"
  local version=k8s.io/component-base/version started=$SECONDS
  local ldflags="-s -w -X $version.gitVersion=v$KUBE_VERSION -X $version.gitMajor=1 -X $version.gitMinor=${KUBE_VERSION#1.}"
  ldflags="${ldflags%.*}" # gitMinor is "34", not "34.4"
  if [[ ! -x "$bin/etcd" ]]; then
    log "building etcd $ETCD_VERSION"
    (cd "$root/tools/kube-testbed/etcd" && nice -n 10 go build -mod=readonly -trimpath -ldflags "-s -w" -o "$bin/etcd.part" go.etcd.io/etcd/server/v3)
    mv "$bin/etcd.part" "$bin/etcd"
  fi
  for command in kube-apiserver kube-controller-manager; do
    [[ -x "$bin/$command" ]] && continue
    log "building $command $KUBE_VERSION (the first build takes 10-20 minutes)"
    (cd "$root/tools/kube-testbed/apiserver" &&
      nice -n 10 go build -mod=readonly -trimpath -ldflags "$ldflags" -o "$bin/$command.part" "k8s.io/kubernetes/cmd/$command")
    mv "$bin/$command.part" "$bin/$command"
  done
  log "built in $((SECONDS - started)) s under $bin"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

certificates() {
  local dir=$1
  (
    cd "$dir"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=nstream-testbed-ca" \
      -keyout ca.key -out ca.crt 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout serving.key -out serving.csr 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1,IP:10.0.0.1\nextendedKeyUsage=serverAuth\n' >serving.ext
    openssl x509 -req -in serving.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile serving.ext -out serving.crt 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=admin" -keyout admin.key -out admin.csr 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\n' >admin.ext
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile admin.ext -out admin.crt 2>/dev/null
    openssl genrsa -out service-account.key 2048 2>/dev/null
    rm -f ./*.csr ./*.ext
  )
}

kubeconfig() {
  local dir=$1 port=$2 user=$3 cert=$4 key=$5
  cat <<EOF
apiVersion: v1
kind: Config
clusters:
- name: testbed
  cluster:
    server: https://127.0.0.1:$port
    certificate-authority-data: $(base64 -w0 <"$dir/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 <"$cert")
    client-key-data: $(base64 -w0 <"$key")
contexts:
- name: testbed
  context: {cluster: testbed, user: $user, namespace: default}
current-context: testbed
EOF
}

wait_for() {
  local what=$1 url=$2 dir=$3 tries=${4:-300}
  for _ in $(seq "$tries"); do
    if curl -sf --cacert "$dir/ca.crt" --cert "$dir/admin.crt" --key "$dir/admin.key" "$url" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.2
  done
  log "$what did not become ready; logs under $dir"
  return 1
}

up() {
  build
  if [[ -f "$state/kubeconfig" ]] && [[ -f "$state/kube-apiserver.pid" ]] && kill -0 "$(cat "$state/kube-apiserver.pid")" 2>/dev/null; then
    log "already running"
    echo "export KUBECONFIG=$state/kubeconfig"
    return 0
  fi
  rm -rf "$state"
  mkdir -p "$state/etcd"
  certificates "$state"
  local etcd_port peer_port api_port
  etcd_port=$(free_port)
  peer_port=$(free_port)
  api_port=$(free_port)

  "$bin/etcd" --name testbed --data-dir "$state/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "testbed=http://127.0.0.1:$peer_port" --unsafe-no-fsync --log-level warn \
    >"$state/etcd.log" 2>&1 &
  echo $! >"$state/etcd.pid"

  "$bin/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" --cert-dir "$state" \
    --tls-cert-file "$state/serving.crt" --tls-private-key-file "$state/serving.key" \
    --client-ca-file "$state/ca.crt" --authorization-mode RBAC \
    --service-cluster-ip-range 10.0.0.0/24 --allow-privileged=true \
    --service-account-issuer "https://127.0.0.1:$api_port/" \
    --service-account-key-file "$state/service-account.key" \
    --service-account-signing-key-file "$state/service-account.key" \
    --endpoint-reconciler-type none --disable-admission-plugins ServiceAccount \
    >"$state/kube-apiserver.log" 2>&1 &
  echo $! >"$state/kube-apiserver.pid"

  kubeconfig "$state" "$api_port" admin "$state/admin.crt" "$state/admin.key" >"$state/kubeconfig"
  wait_for kube-apiserver "https://127.0.0.1:$api_port/readyz" "$state"

  "$bin/kube-controller-manager" --kubeconfig "$state/kubeconfig" \
    --authentication-kubeconfig "$state/kubeconfig" --authorization-kubeconfig "$state/kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 0 --leader-elect=false \
    --controllers 'deployment-controller,replicaset-controller,garbage-collector-controller,namespace-controller,serviceaccount-controller,endpointslice-controller,job-controller' \
    --service-account-private-key-file "$state/service-account.key" --root-ca-file "$state/ca.crt" \
    --use-service-account-credentials=false \
    >"$state/kube-controller-manager.log" 2>&1 &
  echo $! >"$state/kube-controller-manager.pid"

  # The CRDs, the way a user installs them; the API server answers them Established.
  local crd
  for crd in "$root"/deploy/crds/*.yaml; do
    curl -sf --cacert "$state/ca.crt" --cert "$state/admin.crt" --key "$state/admin.key" \
      -X PATCH -H 'Content-Type: application/apply-patch+yaml' --data-binary "@$crd" \
      "https://127.0.0.1:$api_port/apis/apiextensions.k8s.io/v1/customresourcedefinitions/$(basename "$crd" .yaml)?fieldManager=nstream-testbed&force=true" \
      >/dev/null || { log "installing $crd failed"; exit 1; }
  done
  log "running: etcd, kube-apiserver (https://127.0.0.1:$api_port), kube-controller-manager; CRDs installed"
  log "stop with: scripts/testbed.sh down"
  echo "export KUBECONFIG=$state/kubeconfig"
}

down() {
  local name pid
  for name in kube-controller-manager kube-apiserver etcd; do
    if [[ -f "$state/$name.pid" ]]; then
      pid=$(cat "$state/$name.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$state"
  log "stopped"
}

case "${1:-}" in
  build) build ;;
  up) up ;;
  down) down ;;
  bin-dir) echo "$bin" ;;
  *)
    echo "usage: $0 build|up|down|bin-dir" >&2
    exit 2
    ;;
esac
