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
RUN scripts/build-release.sh

# Runtime: Java, Kafka (KRaft, single node) and the binaries only.
FROM debian:bookworm-slim
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
