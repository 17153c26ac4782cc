"""The development stack behind ``make run`` (``python -m src.dev``).

On a fresh machine the service should show all of itself in the first ten minutes: events on a
topic, an audit trail, mail one can read. With ``ENVIRONMENT=development`` the launcher starts
whatever servers the settings leave unconfigured (a Kafka-protocol broker, Redis, a mail
catcher) on free loopback ports, runs the service against them, and stops all of it with the
service. Outside development, or with ``DEV_STACK=off``, it runs the service alone, exactly as
configured. The servers come from the development dependencies (``.[dev]``): nothing here is
imported by the service itself except the ``/dev/mail`` page (``mail_page``).
"""
