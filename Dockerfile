# Multi-stage build of the idgate binary.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
RUN cargo build --release --locked --bin idgate

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/log/idgate /certs
COPY --from=build /src/target/release/idgate /usr/local/bin/idgate
# 5439 gateway, 9439 admin API, 8400 the dev IdP (dev-idp only)
EXPOSE 5439 9439 8400
ENTRYPOINT ["/usr/local/bin/idgate"]
CMD ["serve", "--config", "/etc/idgate/idgate.toml"]
