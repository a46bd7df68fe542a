# The assignment's workflow with our binaries:
#   docker build . -t p7
#   docker run -d -v ./files:/files --name=p7 p7
#   docker exec -it p7 producer
#   docker exec -it p7 debug
#   docker exec -it p7 consumer 0 2
#   docker exec -it p7 plot
#   docker exec -it p7 consumer export
#   docker exec -it p7 consumer inspect-state
#   docker exec -it p7 dashboard --listen 0.0.0.0:8080   (with -p 8080:8080 on run;
#     add --web-config-file for TLS and a password: docs/operations.md, The HTTP endpoints)

# Builder: the same script a developer runs (scripts/build-release.sh). No
# protoc needed (protox compiles the .proto in Rust); librdkafka 2.12.1 is
# built with gcc and make from vendor/rdkafka-sys (docs/design.md: Dependencies).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN scripts/build-release.sh && mkdir -p /empty

# The runtime image, for deployments against your own Kafka:
#   docker build --target runtime -t weatherstream .
#   docker run -v ws-files:/files -p 8797:8797 weatherstream \
#     consumer --group weatherstream-stats
# (metrics and the probes on port 8797: CONSUMER_METRICS_ADDR below)
# The binaries only, on distroless's glibc base (glibc and libgcc: all the
# binaries link; OpenSSL and librdkafka are inside them), as its non-root
# user (65532), /files a volume that user owns. tests/runtime_image.rs runs
# the binaries in a chroot holding only those libraries.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=build /src/target/release/producer /src/target/release/consumer /src/target/release/debug /src/target/release/plot /src/target/release/demo /src/target/release/dashboard /usr/local/bin/
COPY --from=build --chown=65532:65532 /empty /files
ENV FILES_DIR=/files \
    CONSUMER_METRICS_ADDR=0.0.0.0:8797
WORKDIR /files
VOLUME /files
USER 65532:65532
EXPOSE 8797 8080
CMD ["consumer", "--help"]

# The assignment's image (the default target): Java, Kafka (KRaft, single
# node) and the binaries.
FROM debian:bookworm-slim AS assignment
ARG KAFKA_VERSION=3.9.1
ARG SCALA_VERSION=2.13
RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless curl ca-certificates \
 && curl -fsSL "https://archive.apache.org/dist/kafka/${KAFKA_VERSION}/kafka_${SCALA_VERSION}-${KAFKA_VERSION}.tgz" \
    | tar -xz -C /opt \
 && ln -s "/opt/kafka_${SCALA_VERSION}-${KAFKA_VERSION}" /opt/kafka \
 && apt-get purge -y curl && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/producer /src/target/release/consumer /src/target/release/debug /src/target/release/plot /src/target/release/demo /src/target/release/dashboard /usr/local/bin/
COPY scripts/docker-start-kafka.sh /usr/local/bin/start-kafka
ENV FILES_DIR=/files \
    KAFKA_BOOTSTRAP_SERVERS=localhost:9092
WORKDIR /files
VOLUME /files
EXPOSE 9092 8080
CMD ["start-kafka"]
