from src.services.kafka.manager import KafkaManager, KafkaUnavailableError
from src.services.kafka.serializers import KafkaSerializationError, KafkaSerializer

__all__ = ["KafkaManager", "KafkaSerializationError", "KafkaSerializer", "KafkaUnavailableError"]
