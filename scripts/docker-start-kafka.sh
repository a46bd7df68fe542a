#!/usr/bin/env bash
# The p7 image's entry point: a single-node Apache Kafka in KRaft mode on
# localhost:9092, as in the original assignment's image. Its data lives in
# the container; the statistics live in /files (a volume).
set -euo pipefail
config=/opt/kafka/config/kraft/server.properties
if [ ! -f /tmp/kraft-combined-logs/meta.properties ]; then
  /opt/kafka/bin/kafka-storage.sh format -t "$(/opt/kafka/bin/kafka-storage.sh random-uuid)" -c "$config"
fi
exec /opt/kafka/bin/kafka-server-start.sh "$config"
