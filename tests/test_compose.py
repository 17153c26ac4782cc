"""docker-compose.yaml, Dockerfile and .dockerignore, checked by reading them.

No Docker engine runs here, so these tests hold the files to what the service needs: every
container has a health check, the app starts only once its dependencies are healthy, and every
variable handed to the app is one the settings know.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from src.config.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPENDENCIES = ("postgres", "redis", "kafka")


def _interpolate(value: str) -> str:
    """Compose's ``${NAME:-default}`` / ``${NAME-default}`` / ``${NAME}`` with nothing set
    (``${NAME:?message}``, which compose refuses to start without, becomes empty)."""
    value = re.sub(r"\$\{(\w+):?\?[^}]*\}", "", value)
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = compose["services"]
    return found


@pytest.fixture(scope="module")
def app_env(services: dict[str, Any]) -> dict[str, str | None]:
    env = services["app"]["environment"]
    assert isinstance(env, dict), "app.environment should be a mapping"
    return {
        name: None if value is None else _interpolate(str(value)) for name, value in env.items()
    }


def _healthcheck_command(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return test
    assert test[0] in ("CMD", "CMD-SHELL"), test
    return " ".join(test[1:])


def test_services_are_there(services: dict[str, Any]) -> None:
    assert {"app", *DEPENDENCIES} <= set(services)


@pytest.mark.parametrize("name", ["app", *DEPENDENCIES])
def test_every_service_has_a_healthcheck(services: dict[str, Any], name: str) -> None:
    healthcheck = services[name].get("healthcheck")
    assert healthcheck, f"{name} has no healthcheck"
    assert not healthcheck.get("disable", False)
    assert _healthcheck_command(services[name]).strip()
    for field in ("interval", "timeout", "retries"):
        assert field in healthcheck, f"{name}.healthcheck.{field} missing"


def test_healthchecks_ask_the_real_thing(services: dict[str, Any]) -> None:
    assert "/api/v1/health/live" in _healthcheck_command(services["app"])
    assert "pg_isready" in _healthcheck_command(services["postgres"])
    assert re.search(r"redis-cli\b.*\bping", _healthcheck_command(services["redis"]))
    kafka = _healthcheck_command(services["kafka"])
    assert re.search(r"kafka-(topics|broker-api-versions)\.sh .*--bootstrap-server", kafka)


def test_app_waits_for_healthy_dependencies(services: dict[str, Any]) -> None:
    depends_on = services["app"]["depends_on"]
    assert isinstance(depends_on, dict), "depends_on needs the long form to carry conditions"
    for name in DEPENDENCIES:
        assert depends_on[name]["condition"] == "service_healthy", name


def test_app_is_built_here_and_published_on_8000(services: dict[str, Any]) -> None:
    app = services["app"]
    build = app["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (ROOT / context / dockerfile).is_file()
    container_ports = {str(port).rsplit(":", 1)[-1].split("/")[0] for port in app["ports"]}
    assert "8000" in container_ports


def test_images(services: dict[str, Any]) -> None:
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")
    image, _, tag = services["kafka"]["image"].partition(":")
    assert image == "apache/kafka"
    version = tuple(int(part) for part in tag.split("-")[0].split("."))
    assert version >= (3, 8, 0), tag


def test_app_environment_names_are_settings(app_env: dict[str, str | None]) -> None:
    unknown = set(app_env) - set(Settings.model_fields)
    assert not unknown, f"not a setting: {sorted(unknown)}"


def test_app_environment_is_valid_settings(app_env: dict[str, str | None]) -> None:
    values = {name: value for name, value in app_env.items() if value is not None}
    settings = Settings(_env_file=None, **values)  # type: ignore[arg-type]
    assert settings.is_production
    assert settings.DATABASE_URL.startswith("postgresql+asyncpg://")
    assert settings.REDIS_HOST == "redis"
    assert settings.KAFKA_BOOTSTRAP_SERVERS == "kafka:9092"
    assert settings.KAFKA_ENABLE_IDEMPOTENCE


def test_database_url_matches_the_postgres_service(
    services: dict[str, Any], app_env: dict[str, str | None]
) -> None:
    url = app_env["DATABASE_URL"]
    assert url is not None
    match = re.fullmatch(r"postgresql\+asyncpg://([^:@]+):([^@]*)@([^:/]+):(\d+)/(\w+)", url)
    assert match, url
    user, password, host, port, database = match.groups()
    postgres = {k: _interpolate(str(v)) for k, v in services["postgres"]["environment"].items()}
    assert (host, port) == ("postgres", "5432")
    assert user == postgres["POSTGRES_USER"]
    assert password == postgres["POSTGRES_PASSWORD"]
    assert database == postgres["POSTGRES_DB"]


def test_kafka_is_a_single_kraft_node_reachable_as_kafka_9092(services: dict[str, Any]) -> None:
    env = {k: str(v) for k, v in services["kafka"]["environment"].items()}
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@")
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    # The log directory is on the volume, or topics vanish when the container is recreated.
    mounts = {str(volume).split(":")[1] for volume in services["kafka"].get("volumes", [])}
    assert env["KAFKA_LOG_DIRS"] in mounts


def test_signing_key_is_mounted(compose: dict[str, Any], app_env: dict[str, str | None]) -> None:
    app = compose["services"]["app"]
    mounted = {str(volume).split(":")[1] for volume in app.get("volumes", [])}
    for secret in app.get("secrets", []):
        name = secret if isinstance(secret, str) else secret["source"]
        target = name if isinstance(secret, str) else secret.get("target", name)
        assert name in compose.get("secrets", {}), f"secret {name} is not declared"
        mounted.add(target if target.startswith("/") else f"/run/secrets/{target}")
    assert app_env["JWT_PRIVATE_KEY_FILE"] in mounted


def test_production_secrets_must_come_from_the_environment(
    services: dict[str, Any], app_env: dict[str, str | None]
) -> None:
    """Production refuses to start without ENCRYPTION_KEY: compose says so up front, and no key
    is committed."""
    raw = str(services["app"]["environment"]["ENCRYPTION_KEY"])
    assert re.fullmatch(r"\$\{ENCRYPTION_KEY:\?[^}]+\}", raw), raw
    assert app_env["ENCRYPTION_KEY"] == ""
    text = (ROOT / "docker-compose.yaml").read_text()
    assert re.search(r"^#.*ENCRYPTION_KEY", text, re.MULTILINE)


def test_first_admin_placeholders_are_documented(app_env: dict[str, str | None]) -> None:
    assert {"FIRST_ADMIN_EMAIL", "FIRST_ADMIN_PASSWORD"} <= set(app_env)
    # No password is committed: the values come from the shell or .env.
    assert not app_env["FIRST_ADMIN_PASSWORD"]
    text = (ROOT / "docker-compose.yaml").read_text()
    assert re.search(r"^#.*FIRST_ADMIN_EMAIL", text, re.MULTILINE)


# --- Dockerfile ----------------------------------------------------------------------------------
def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def _startup_command() -> str:
    """What the container runs, with an entry-point script read in place of its name."""
    parts = [args for keyword, args in _instructions() if keyword in ("ENTRYPOINT", "CMD")]
    command = " ".join(parts)
    for script in re.findall(r"[\w./-]+\.sh", command):
        local = ROOT / Path(script).name
        if local.is_file():
            code = [line for line in local.read_text().splitlines() if not line.startswith("#")]
            command += "\n" + "\n".join(code)
    return command


def test_dockerfile_base_image() -> None:
    froms = [args for keyword, args in _instructions() if keyword == "FROM"]
    assert froms[-1].split()[0] == "python:3.11-slim"


def test_dockerfile_runs_as_non_root() -> None:
    users = [args for keyword, args in _instructions() if keyword == "USER"]
    assert users, "no USER instruction: the service would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_dockerfile_installs_the_package_and_exposes_8000() -> None:
    instructions = _instructions()
    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    # The package itself, with the optional extras a build argument names (none by default).
    assert re.search(r"pip install (\S+ )*\.(\s|$)", runs) or re.search(
        r'pip install (\S+ )*"\.\$\{EXTRAS:\+\[\$EXTRAS\]\}"', runs
    )
    assert re.search(r'^ARG EXTRAS=""$', (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert any(keyword == "EXPOSE" and "8000" in args.split() for keyword, args in instructions)
    healthchecks = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    assert healthchecks and "/api/v1/health/live" in healthchecks[0]


def test_container_migrates_then_serves() -> None:
    # `serve --migrate` migrates before it serves: tests/test_cli.py starts it on an empty
    # database.
    command = _startup_command()
    serve = re.search(r"user-service serve --migrate --host 0\.0\.0\.0 --port 8000$", command, re.M)
    assert serve, "user-service serve --migrate is not started on 0.0.0.0:8000"
    # `set -e`: a failed migration must stop the container, not start a service that refuses.
    if "docker-entrypoint.sh" in command:
        assert re.search(r"^set -\w*e", (ROOT / "docker-entrypoint.sh").read_text(), re.M)


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; ``!`` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_secrets_out_and_build_inputs_in() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for private in (".env", ".env.production", ".venv", ".git", "data", "secrets"):
        assert _ignored(private, patterns), f"{private} would be sent to the build"
    copied = []
    for keyword, args in _instructions():
        if keyword == "COPY" and "--from" not in args:
            sources = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
            copied.extend(sources)
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
        assert not _ignored(source.rstrip("/"), patterns), f"COPY {source} is in .dockerignore"
