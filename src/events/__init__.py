"""Events about users: recorded in the outbox with the change, published to Kafka later."""
