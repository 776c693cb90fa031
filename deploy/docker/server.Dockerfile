# nstream-server, CPU variant. A runtime image around a binary built outside it:
#
#   scripts/images.sh build            # cargo build --release, then this file and operator.Dockerfile
#
# or by hand, with a context folder that holds only the binary (not the repository: its target/
# is gigabytes):
#
#   mkdir -p /tmp/ctx && cp target/release/nstream-server /tmp/ctx/
#   podman build -f deploy/docker/server.Dockerfile -t nstream-server:0.1.0 /tmp/ctx
#
# The binary links glibc dynamically: build it on a system whose glibc is not newer than the
# base's (Debian 12 bookworm: 2.36). BASE is any glibc image with /etc/ssl/certs; CI builds on a
# debootstrapped bookworm made locally (scripts/images.sh check).
#
# The operator runs it as `nstream-server --model-file config/model.yaml ...` in /nstream, as user
# 65532, with a read-only root filesystem (HOME=/tmp and the model cache are volumes).
ARG BASE=gcr.io/distroless/cc-debian12:nonroot
FROM ${BASE}
COPY nstream-server /usr/local/bin/nstream-server
# The command line too: the operator's Distillation Jobs run `nstream distill` from this image.
COPY nstream /usr/local/bin/nstream
# The Deployment's command is the bare name `nstream-server`; a base imported from a tarball has no
# PATH of its own.
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
WORKDIR /nstream
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/nstream-server"]
