# nstream-operator and nstream-router. A runtime image around two binaries built outside it:
#
#   scripts/images.sh build            # cargo build --release, then this file and server.Dockerfile
#
# or by hand, with a context folder that holds only the two binaries:
#
#   mkdir -p /tmp/ctx && cp target/release/nstream-operator target/release/nstream-router /tmp/ctx/
#   podman build -f deploy/docker/operator.Dockerfile -t nstream-operator:0.1.0 /tmp/ctx
#
# Small: no candle, no model clients; only the Kubernetes API (rustls on ring, so no OpenSSL). It
# links glibc dynamically: build it on a system whose glibc is not newer than the base's (Debian 12
# bookworm: 2.36). CI builds on a debootstrapped bookworm made locally (scripts/images.sh check).
ARG BASE=gcr.io/distroless/cc-debian12:nonroot
FROM ${BASE}
COPY nstream-operator /usr/local/bin/nstream-operator
# The router runs from this image too (deploy/router: command /usr/local/bin/nstream-router).
COPY nstream-router /usr/local/bin/nstream-router
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
USER 65532:65532
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/nstream-operator"]
