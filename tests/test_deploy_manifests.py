"""deploy/kubernetes/, checked by reading it.

No cluster runs here. Every manifest is validated against the Kubernetes API schemas that the
``kubernetes-validate`` package ships (offline, strict: an unknown or misspelt field fails), and
held to what the service needs: probes on its health endpoints, non-root containers on a
read-only root, the relay in its own Deployment and not in the API, setting names the service
knows, and a Secret template without a real secret in it.
"""

from __future__ import annotations

import base64
import binascii
import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from src.config.settings import Settings, SettingsError
from src.security.sealing import load_sealer

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes the manifests are for, and the newest whose schemas the package ships.
VERSIONS = ("1.30", kubernetes_validate.latest_version())
PLACEHOLDER = "CHANGE-ME"
UID = 10001
LIVE = "/api/v1/health/live"
READY = "/api/v1/health/ready"


def _documents() -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) for every YAML document under deploy/kubernetes/."""
    found = []
    for path in sorted(DEPLOY.glob("*.y*ml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                assert isinstance(document, dict), path.name
                found.append((path.name, document))
    return found


DOCUMENTS = _documents()
RESOURCES = [(name, doc) for name, doc in DOCUMENTS if doc["kind"] != "Kustomization"]


def _one(kind: str, name: str) -> dict[str, Any]:
    matches = [d for _, d in RESOURCES if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def _workloads() -> list[dict[str, Any]]:
    return [doc for _, doc in RESOURCES if doc["kind"] in ("Deployment", "Job")]


def _component(component: str) -> dict[str, Any]:
    [workload] = [
        doc
        for doc in _workloads()
        if doc["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
        == component
    ]
    return workload


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = workload["spec"]["template"]["spec"]
    return pod


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    [container] = _pod(workload)["containers"]
    assert isinstance(container, dict)
    return container


def _argv(container: dict[str, Any]) -> list[str]:
    return [str(part) for part in [*container.get("command", []), *container.get("args", [])]]


def _data(resource: dict[str, Any]) -> dict[str, str]:
    return {**resource.get("data", {}), **resource.get("stringData", {})}


def _environment(container: dict[str, Any]) -> dict[str, str]:
    """What the container's environment holds, by name: from its ConfigMaps and Secrets (the
    template's placeholders for those), then its own ``env`` (which wins, as in Kubernetes)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(_data(_one("ConfigMap", source["configMapRef"]["name"])))
        else:
            env.update(_data(_one("Secret", source["secretRef"]["name"])))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            value = _data(_one("Secret", ref["name"])).get(ref["key"])
            if value is not None:
                env[item["name"]] = value
    return env


# --- schemas -------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "resource",
    [doc for _, doc in RESOURCES],
    ids=[f"{name}:{doc['kind']}/{doc['metadata']['name']}" for name, doc in RESOURCES],
)
def test_manifest_is_valid_kubernetes(resource: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(resource, version, strict=True)


def test_the_set_is_complete() -> None:
    kinds = sorted(doc["kind"] for _, doc in RESOURCES)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Secret",
            "Secret",
            "Deployment",
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
            "Job",
        ]
    )
    assert (DEPLOY / "README.md").is_file()
    # Namespace-agnostic: the namespace is the one they are applied to.
    assert not [doc for _, doc in RESOURCES if "namespace" in doc["metadata"]]


def test_kustomization_applies_everything_but_the_secret_template() -> None:
    [kustomization] = [doc for _, doc in DOCUMENTS if doc["kind"] == "Kustomization"]
    files = {name for name, doc in RESOURCES}
    listed = set(kustomization["resources"])
    assert listed <= files
    # Applying the template on every deploy would overwrite the real Secrets with placeholders.
    assert files - listed == {"secret.yaml"}
    assert {doc["kind"] for name, doc in RESOURCES if name == "secret.yaml"} == {"Secret"}
    images = {image["name"] for image in kustomization["images"]}
    assert {_container(w)["image"].split(":")[0] for w in _workloads()} == images


# --- the API -------------------------------------------------------------------------------------


def _port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or a Service's port, resolved through the container's named ports."""
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    assert isinstance(number, int)
    return number


def test_api_probes_ask_the_health_endpoints() -> None:
    container = _container(_component("api"))
    probes = {
        kind: container[kind]["httpGet"]
        for kind in ("livenessProbe", "readinessProbe", "startupProbe")
    }
    assert probes["livenessProbe"]["path"] == LIVE
    assert probes["startupProbe"]["path"] == LIVE
    assert probes["readinessProbe"]["path"] == READY
    for probe in probes.values():
        assert _port(container, probe["port"]) == 8000


def test_api_serves_on_8000_without_migrating() -> None:
    """Arguments replace the entry point's "migrate, then serve": pods of one roll-out must not
    race to migrate; the Job does it."""
    argv = _argv(_container(_component("api")))
    assert argv == ["user-service", "serve", "--host", "0.0.0.0", "--port", "8000"], argv
    assert "--migrate" not in argv
    assert "--workers" not in argv, "serve reads WEB_CONCURRENCY from the ConfigMap"
    _is_a_command(argv)


def test_metrics_are_scraped_from_a_port_the_service_does_not_expose() -> None:
    api = _component("api")
    env = _environment(_container(api))
    settings = Settings(_env_file=None, **env)  # type: ignore[arg-type]
    assert settings.METRICS == "open" and settings.METRICS_PORT == 9100
    assert settings.METRICS_HOST == "0.0.0.0"
    ports = {port["name"]: port["containerPort"] for port in _container(api)["ports"]}
    assert ports["metrics"] == settings.METRICS_PORT
    annotations = api["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.METRICS_PORT)
    service = _one("Service", api["metadata"]["name"])
    exposed = {port.get("targetPort") for port in service["spec"]["ports"]}
    assert not exposed & {"metrics", settings.METRICS_PORT}, exposed


def test_service_budget_and_autoscaler_point_at_the_api() -> None:
    api = _component("api")
    labels = api["spec"]["template"]["metadata"]["labels"]
    service = _one("Service", api["metadata"]["name"])
    pdb = _one("PodDisruptionBudget", api["metadata"]["name"])
    hpa = _one("HorizontalPodAutoscaler", api["metadata"]["name"])
    for selector in (service["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
        for other in _workloads():
            if other is not api:
                other_labels = other["spec"]["template"]["metadata"]["labels"]
                assert not selector.items() <= other_labels.items(), other["metadata"]["name"]
    [port] = service["spec"]["ports"]
    assert _port(_container(api), port["targetPort"]) == 8000
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", api["metadata"]["name"])
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert hpa["spec"]["minReplicas"] >= 2, "one pod evicted (the budget) must leave one"
    # The autoscaler owns the count: a fixed one would reset it on every apply.
    assert "replicas" not in api["spec"]


def test_api_leaves_the_relay_to_its_own_deployment() -> None:
    env = _environment(_container(_component("api")))
    assert env["OUTBOX_RELAY_IN_PROCESS"] == "false"
    settings = Settings(_env_file=None, **env)  # type: ignore[arg-type]
    assert settings.OUTBOX_RELAY_IN_PROCESS is False


def _is_a_command(argv: list[str]) -> None:
    """``user-service …``: the console script the image installs, with a subcommand it has."""
    from src.cli import build_parser

    assert argv[0] == "user-service", argv
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["user-service"] == "src.cli:main"
    build_parser().parse_args(argv[1:])  # exits (SystemExit) on an unknown command


def test_relay_deployment_runs_the_relay_command() -> None:
    relay = _component("outbox-relay")
    assert relay["kind"] == "Deployment"
    assert _argv(_container(relay)) == ["user-service", "relay"]
    _is_a_command(_argv(_container(relay)))
    env = _environment(_container(relay))
    assert {"DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS"} <= set(env)
    # It seals nothing and signs nothing: it is not handed the keys.
    assert "ENCRYPTION_KEY" not in env
    assert not _pod(relay).get("volumes")


def test_migration_job_upgrades_to_head() -> None:
    job = _component("migration")
    assert job["kind"] == "Job"
    assert _argv(_container(job)) == ["user-service", "migrate"]
    _is_a_command(_argv(_container(job)))
    assert "DATABASE_URL" in _environment(_container(job))


# --- every workload ------------------------------------------------------------------------------


@pytest.mark.parametrize("workload", _workloads(), ids=lambda w: w["metadata"]["name"])
def test_runs_as_non_root_on_a_read_only_root(workload: dict[str, Any]) -> None:
    pod = _pod(workload)
    for container in pod["containers"]:
        # The container's own securityContext wins over the pod's, field by field.
        context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] == UID
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]) & set(resources["limits"])
    assert pod["automountServiceAccountToken"] is False


# --- settings ------------------------------------------------------------------------------------


def _commented_settings() -> set[str]:
    """Names in commented-out ``NAME: value`` lines of a mapping (indented): offered to be
    uncommented, so they must be settings too."""
    names = set()
    for path in DEPLOY.glob("*.y*ml"):
        names |= set(re.findall(r"^ +# ?([A-Z][A-Z0-9_]+): ", path.read_text(), re.MULTILINE))
    return names


def test_every_variable_is_a_setting() -> None:
    names = set(_commented_settings())
    for workload in _workloads():
        for container in _pod(workload)["containers"]:
            names |= set(_environment(container))
            names |= {item["name"] for item in container.get("env", [])}
    # Every ConfigMap is variables, also one no container uses yet.
    for _, resource in RESOURCES:
        if resource["kind"] == "ConfigMap":
            names |= set(_data(resource))
    assert names, "no variables found"
    unknown = sorted(names - set(Settings.model_fields))
    assert not unknown, f"not settings: {unknown}"


def test_secret_references_exist() -> None:
    for workload in _workloads():
        for item in _container(workload).get("env", []):
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref and not ref.get("optional"):
                assert ref["key"] in _data(_one("Secret", ref["name"])), ref


def test_api_environment_is_valid_production_settings() -> None:
    api = _container(_component("api"))
    env = _environment(api)
    settings = Settings(_env_file=None, **env)  # type: ignore[arg-type]
    assert settings.is_production
    assert settings.DATABASE_URL.startswith("postgresql+asyncpg://")
    assert settings.PUBLIC_BASE_URL.startswith("https://")
    assert settings.PASSWORD_HASH_WORKERS >= 1, "0 would size the hashing pool by the node"
    # The signing key file is where its Secret is mounted, under a key that Secret has.
    key_file = settings.JWT_PRIVATE_KEY_FILE
    assert key_file is not None
    volumes = {volume["name"]: volume for volume in _pod(_component("api"))["volumes"]}
    [mount] = [m for m in api["volumeMounts"] if key_file.parent == Path(m["mountPath"])]
    secret = _one("Secret", volumes[mount["name"]]["secret"]["secretName"])
    assert key_file.name in _data(secret)


def test_web_concurrency_fits_the_cpu_limit() -> None:
    api = _container(_component("api"))
    processes = int(_environment(api)["WEB_CONCURRENCY"])
    cpu = str(api["resources"]["limits"]["cpu"])
    cores = int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    assert processes <= cores


# --- no secrets ----------------------------------------------------------------------------------


def _secrets() -> list[dict[str, Any]]:
    return [doc for _, doc in RESOURCES if doc["kind"] == "Secret"]


@pytest.mark.parametrize("secret", _secrets(), ids=lambda s: s["metadata"]["name"])
def test_secret_template_holds_only_placeholders(secret: dict[str, Any]) -> None:
    # base64 under data: would hide what is committed from a reviewer.
    assert "data" not in secret
    for key, value in secret["stringData"].items():
        assert PLACEHOLDER in value, f"{key} is not a marked placeholder"
        assert "PRIVATE KEY" not in value, key


def test_no_key_material_anywhere() -> None:
    for path in DEPLOY.iterdir():
        text = path.read_text()
        assert not re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", text), path.name
        for token in re.findall(r"[A-Za-z0-9_\-+/]{40,}={0,2}", text):
            try:
                decoded = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            except (binascii.Error, ValueError):
                continue
            assert len(decoded) < 32, f"{path.name}: {token[:8]}... looks like a key"


def test_placeholders_stop_the_service_rather_than_run_it() -> None:
    """A template applied unfilled must not give a running service with a guessable key."""
    [env_secret] = [s for s in _secrets() if "ENCRYPTION_KEY" in s["stringData"]]
    values = env_secret["stringData"]
    settings = Settings(_env_file=None, ENVIRONMENT="production", **values)
    with pytest.raises(SettingsError):
        load_sealer(settings)
    assert urlsplit(settings.DATABASE_URL).password == PLACEHOLDER
