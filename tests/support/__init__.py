"""What the tests share: the app in-process (``app``), accounts and sign-in (``auth``), users and
the outbox (``users``), Kafka records (``events``), an SMTP server (``mail``), the servers the
harness starts and stops (``servers``), and a proxy that breaks links (``tcp_proxy``)."""
