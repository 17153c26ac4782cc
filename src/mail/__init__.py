"""Mail: the courier that turns notification events into mail sent over SMTP.

``src.mail.courier.Courier`` reads notifications (from Kafka, or straight from the outbox when
Kafka is off) and mails each one once, retrying a temporary failure out of line (from
``mail_deliveries``) so it holds up no other mail; ``src.mail.messages`` renders them (with no
text a user chose, except a sign-in's quoted user agent), ``src.mail.sender`` talks SMTP (and
probes it, login included, for the health report). ``python -m src.mail`` runs the courier as a
process of its own.
"""
