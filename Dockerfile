# Build: docker build -t plaza .
# Run:   docker run -d -p 127.0.0.1:8008:8008 -v plaza-data:/data plaza
# See docs/install.md.

FROM rust:1-bookworm AS builder
# The RocksDB bindings need libclang at build time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends clang \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 plaza \
    && useradd --system --uid 10001 --gid plaza --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin plaza \
    && mkdir -p /data \
    && chown plaza:plaza /data
COPY --from=builder /src/target/release/plaza /usr/local/bin/plaza

# Environment variables override the config file (PLAZA_CONFIG), so these two always apply
# in the container unless overridden with `docker run -e`.
ENV PLAZA_DATABASE__PATH=/data/db \
    PLAZA_LISTEN='["0.0.0.0:8008"]'
VOLUME ["/data"]
EXPOSE 8008
USER plaza
WORKDIR /data
ENTRYPOINT ["/usr/local/bin/plaza"]
CMD ["serve"]
