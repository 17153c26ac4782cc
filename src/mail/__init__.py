"""Mail: the courier that turns notification events into mail sent over SMTP.

``src.mail.courier.Courier`` reads notifications (from Kafka, or straight from the outbox when
Kafka is off) and mails each one at most once; ``src.mail.messages`` renders them,
``src.mail.sender`` talks SMTP (and probes it for the health report). ``python -m src.mail`` runs
the courier as a process of its own.
"""
