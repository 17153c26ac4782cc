"""Infrastructure services: connections to Redis and Kafka, and what is built on them."""

from src.services.connections import (
    close_kafka_connection,
    close_redis_connection,
    get_kafka_from_app,
    get_redis_from_app,
    initialize_kafka_connection,
    initialize_redis_connection,
)
from src.services.kafka import KafkaManager, KafkaSerializer

__all__ = [
    "KafkaManager",
    "KafkaSerializer",
    "close_kafka_connection",
    "close_redis_connection",
    "get_kafka_from_app",
    "get_redis_from_app",
    "initialize_kafka_connection",
    "initialize_redis_connection",
]
