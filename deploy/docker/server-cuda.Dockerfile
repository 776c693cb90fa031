# nstream-server, CUDA variant (GPU pods), published as ghcr.io/nstream-ai/nstream-server-cuda:
#
#   podman build -f deploy/docker/server-cuda.Dockerfile -t nstream-server-cuda:0.1.0 .   # or docker build
#
# Unlike server.Dockerfile it compiles inside the image (context: the repository root): the kernels
# need nvcc from the CUDA devel image, and the binary then matches the runtime image's glibc. It
# needs registry access (nvidia/cuda, rustup) and is not built by CI, which has no CUDA toolkit.
# Built with `--features cuda`; the operator picks this image for pods that ask for `gpu` and adds
# `--device cuda`.
ARG CUDA_VERSION=12.4.1
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu22.04 AS build
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates build-essential pkg-config \
    && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.89.0
ENV PATH=/root/.cargo/bin:$PATH
# The compute capabilities to build kernels for (8.0 A100, 8.9 L4/L40, 9.0 H100/H200).
ARG CUDA_COMPUTE_CAP=80
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/root/.cargo/registry --mount=type=cache,target=/src/target \
    cargo build --release --locked -p nstream-server-bin -p nstream --features cuda \
    && cp target/release/nstream-server target/release/nstream /

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu22.04
COPY --from=build /nstream-server /usr/local/bin/nstream-server
# The command line too: the operator's Distillation Jobs run `nstream distill` from this image.
COPY --from=build /nstream /usr/local/bin/nstream
RUN groupadd -g 65532 nonroot && useradd -u 65532 -g 65532 -d /tmp -s /usr/sbin/nologin nonroot
WORKDIR /nstream
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["nstream-server"]
