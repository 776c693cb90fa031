# nstream-server, CUDA variant (GPU pods): docker build -f deploy/docker/server-cuda.Dockerfile -t nstream-server:0.1.0-cuda .
# Built with `--features cuda` against the CUDA toolkit; runs on the CUDA runtime image. The operator
# picks this image for pods that ask for `gpu` and adds `--device cuda`.
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
    cargo build --release --locked -p nstream-server-bin --features cuda && cp target/release/nstream-server /nstream-server

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu22.04
COPY --from=build /nstream-server /usr/local/bin/nstream-server
RUN groupadd -g 65532 nonroot && useradd -u 65532 -g 65532 -d /tmp -s /usr/sbin/nologin nonroot
WORKDIR /nstream
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["nstream-server"]
