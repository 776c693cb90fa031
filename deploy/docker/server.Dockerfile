# nstream-server, CPU variant: docker build -f deploy/docker/server.Dockerfile -t nstream-server:0.1.0 .
# The operator runs it as `nstream-server --model-file config/model.yaml ...` in /nstream, as user
# 65532, with a read-only root filesystem (HOME=/tmp and the model cache are volumes).
FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry --mount=type=cache,target=/src/target \
    cargo build --release --locked -p nstream-server-bin && cp target/release/nstream-server /nstream-server

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /nstream-server /usr/local/bin/nstream-server
WORKDIR /nstream
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["nstream-server"]
