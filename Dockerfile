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
# glibc's allocator: a fixed mmap threshold returns every buffer over 128 KiB (a batch's vectors,
# its SQL arguments) to the system when freed, where the default raises the threshold after the
# first such free and keeps them in the heap; two arenas instead of one per thread. The
# projector's peak RSS over a catch-up fell from 311 to 209 MiB (BENCHMARKS.md, "Catch-up").
ENV MALLOC_MMAP_THRESHOLD_=131072 MALLOC_ARENA_MAX=2
