# nstream-operator: docker build -f deploy/docker/operator.Dockerfile -t nstream-operator:0.1.0 .
# Small: no candle, no model clients; only the Kubernetes API (rustls on ring).
FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry --mount=type=cache,target=/src/target \
    cargo build --release --locked -p nstream-operator-bin && cp target/release/nstream-operator /nstream-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /nstream-operator /usr/local/bin/nstream-operator
USER 65532:65532
EXPOSE 8081
ENTRYPOINT ["nstream-operator"]
