# Multi-stage build of both services. `docker compose up` uses it; see docker-compose.yml.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake libssl-dev libsasl2-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p ingest -p projector

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 libsasl2-2 \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 app
COPY --from=build /src/target/release/ingest /src/target/release/projector /usr/local/bin/
COPY entitlements.toml /etc/stripe-pipeline/entitlements.toml
USER app
ENV ENTITLEMENTS_CONFIG=/etc/stripe-pipeline/entitlements.toml
