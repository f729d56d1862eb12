"""The deployment files: Dockerfile, the image's config, compose, Kubernetes, systemd.

Fast and container-free: the files are parsed and cross-checked against each other and
against the daemon (every config they carry passes the real `enkwatch check-config`).
The image itself is proven by `scripts/container-smoke`, which `.ci/run` runs after pytest.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from enkwatch import __version__
from enkwatch.simulator import load_scenario
from tests.kit import invoke

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "docker-compose.yaml"
UNIT = DEPLOY / "systemd" / "enkwatch.service"

IMAGE_CONFIG = "/etc/enkwatch/config.yaml"
STATE_DIR = "/var/lib/enkwatch"


# -- helpers ------------------------------------------------------------------------------


def check_config(text: str, tmp_path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`enkwatch check-config` on `text`: it must pass; its normalized output."""
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    # --file-only: the image's state directory and mounted key exist in the container only
    proc = invoke("check-config", "--file-only", "--config", str(path), env=env)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def listen_port(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def k8s_objects() -> dict[str, dict[str, Any]]:
    """Every object of deploy/kubernetes/*.yaml but the kustomization, by kind."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                assert doc["kind"] not in objects, f"two {doc['kind']} objects"
                objects[doc["kind"]] = doc
    return objects


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    return k8s_objects()


@pytest.fixture(scope="module")
def pod(k8s: dict[str, dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = k8s["Deployment"]["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def container(pod: dict[str, Any]) -> dict[str, Any]:
    (only,) = pod["containers"]
    c: dict[str, Any] = only
    return c


@pytest.fixture(scope="module")
def k8s_config(k8s: dict[str, dict[str, Any]]) -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(k8s["ConfigMap"]["data"]["config.yaml"])
    return raw


def mount_of(container: dict[str, Any], volume: str) -> str:
    (path,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume]
    return str(path)


def volume(pod: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [v for v in pod["volumes"] if v["name"] == name]
    return dict(found)


def env_of(container: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [e for e in container.get("env", []) if e["name"] == name]
    return dict(found)


# -- the image ----------------------------------------------------------------------------


def test_dockerfile_follows_the_issue() -> None:
    steps = dockerfile_instructions()
    froms = [args for word, args in steps if word == "FROM"]
    assert steps[0] == ("ARG", "PYTHON_IMAGE=python:3.12-slim")
    assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
    assert all(f.startswith("${PYTHON_IMAGE}") for f in froms)
    runtime = steps[max(i for i, (w, _) in enumerate(steps) if w == "FROM") :]
    last = {word: args for word, args in runtime}
    assert last["ENTRYPOINT"] == '["enkwatch"]'
    assert last["CMD"] == '["run"]'
    user = last["USER"].split(":")[0]
    assert user.isdigit() and int(user) > 0, "a fixed non-root UID"
    assert last["VOLUME"] == f'["{STATE_DIR}"]'
    assert last["HEALTHCHECK"].endswith('CMD ["enkwatch", "healthcheck"]')
    env = " ".join(args for word, args in runtime if word == "ENV")
    for setting in (
        "PYTHONUNBUFFERED=1",
        "PYTHONDONTWRITEBYTECODE=1",
        f"ENKWATCH_CONFIG={IMAGE_CONFIG}",
    ):
        assert setting in env
    copies = [args for word, args in runtime if word == "COPY"]
    assert any(c.startswith("--from=build /opt/enkwatch") for c in copies), "only the venv"
    assert f"config/container.yaml {IMAGE_CONFIG}" in copies
    labels = " ".join(args for word, args in runtime if word == "LABEL")
    assert "org.opencontainers.image.title" in labels


def test_versions_in_the_files_are_the_package_version() -> None:
    args = [a for w, a in dockerfile_instructions() if w == "ARG"]
    assert f"VERSION={__version__}" in args, "the image's version label"
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    (image,) = kustomization["images"]
    assert image["newTag"] == __version__
    deployment = k8s_objects()["Deployment"]["spec"]["template"]["spec"]
    assert deployment["containers"][0]["image"] == f"enkwatch:{__version__}"


def test_dockerignore_lets_in_what_the_dockerfile_copies() -> None:
    rules = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert "*" in rules, "a whitelist: everything else stays out of the build context"
    for word, args in dockerfile_instructions():
        if word != "COPY" or args.startswith("--from"):
            continue
        *sources, _ = args.split()
        for src in sources:
            assert src.rstrip("/") in allowed, f"COPY {src} is excluded by .dockerignore"
            assert (ROOT / src).exists()


def test_the_image_config_passes_check_config(tmp_path: Path) -> None:
    text = (ROOT / "config" / "container.yaml").read_text(encoding="utf-8")
    out = check_config(text, tmp_path)
    assert out["admin"]["listen"] == "0.0.0.0:9090", "HEALTHCHECK and probes need the admin port"
    assert PurePosixPath(out["state"]["path"]).parent == PurePosixPath(STATE_DIR)
    assert out["api"]["api_key_file"] is None, "$ENKRYPTAI_API_KEY must work as well"
    # the key as a mounted secret file, the way the README shows it
    out = check_config(
        text, tmp_path, env={"ENKWATCH_API__API_KEY_FILE": "/run/secrets/enkrypt_api_key"}
    )
    assert out["api"]["api_key_file"] == "/run/secrets/enkrypt_api_key"


# -- Kubernetes ---------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_k8s_has_the_pieces(k8s: dict[str, dict[str, Any]]) -> None:
    assert set(k8s) >= {"Deployment", "ConfigMap", "Secret", "PersistentVolumeClaim"}
    assert k8s["Deployment"]["spec"]["replicas"] == 1
    # SQLite on a ReadWriteOnce volume: never two pods at once
    assert k8s["Deployment"]["spec"]["strategy"]["type"] == "Recreate"
    assert k8s["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_k8s_config_passes_check_config(k8s: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    out = check_config(k8s["ConfigMap"]["data"]["config.yaml"], tmp_path)
    assert out["tasks"], "the example watches a task"


def test_k8s_config_is_where_the_daemon_reads_it(
    k8s: dict[str, dict[str, Any]], pod: dict[str, Any], container: dict[str, Any]
) -> None:
    config = volume(pod, "config")["configMap"]
    assert config["name"] == k8s["ConfigMap"]["metadata"]["name"]
    (item,) = config["items"]
    assert item["key"] == "config.yaml"
    path = PurePosixPath(mount_of(container, "config")) / item["path"]
    assert str(path) == env_of(container, "ENKWATCH_CONFIG")["value"] == IMAGE_CONFIG
    assert container["args"] == ["run"]


def test_k8s_probes_ask_the_admin_endpoints(
    container: dict[str, Any], k8s_config: dict[str, Any]
) -> None:
    listen = k8s_config["admin"]["listen"]
    assert listen.startswith("0.0.0.0:"), "the kubelet probes the pod IP"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
        assert port == listen_port(listen), f"{probe} asks port {port}, the daemon serves {listen}"


def test_k8s_secret_is_the_key_file_the_config_names(
    k8s: dict[str, dict[str, Any]],
    pod: dict[str, Any],
    container: dict[str, Any],
    k8s_config: dict[str, Any],
) -> None:
    secret = k8s["Secret"]
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    source = volume(pod, "api-key")["secret"]
    assert source["secretName"] == secret["metadata"]["name"]
    (item,) = source["items"]
    assert item["key"] in keys
    key_file = PurePosixPath(mount_of(container, "api-key")) / item["path"]
    assert k8s_config["api"]["api_key_file"] == str(key_file)
    # the file is root:fsGroup; the daemon reads it through its group
    assert source["defaultMode"] & 0o040
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    token = env_of(container, "ENKWATCH_ADMIN_TOKEN")["valueFrom"]["secretKeyRef"]
    assert token["name"] == secret["metadata"]["name"] and token["key"] in keys


def test_k8s_state_is_on_the_claim(
    k8s: dict[str, dict[str, Any]],
    pod: dict[str, Any],
    container: dict[str, Any],
    k8s_config: dict[str, Any],
) -> None:
    claim = volume(pod, "state")["persistentVolumeClaim"]["claimName"]
    assert claim == k8s["PersistentVolumeClaim"]["metadata"]["name"]
    state_dir = mount_of(container, "state")
    assert state_dir == STATE_DIR
    assert PurePosixPath(k8s_config["state"]["path"]).parent == PurePosixPath(state_dir)


def test_k8s_runs_non_root_on_a_read_only_root(
    pod: dict[str, Any], container: dict[str, Any]
) -> None:
    pod_sc, sc = pod["securityContext"], container["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    image_user = next(a for w, a in reversed(dockerfile_instructions()) if w == "USER")
    assert str(pod_sc["runAsUser"]) == image_user.split(":")[0]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # the only writable paths: the state volume, and a small tmpfs for /tmp
    assert mount_of(container, "tmp") == "/tmp"
    assert volume(pod, "tmp")["emptyDir"]["medium"] == "Memory"
    assert pod["automountServiceAccountToken"] is False
    # a Service named enkwatch would put ENKWATCH_* service variables into the environment
    assert pod["enableServiceLinks"] is False


def test_k8s_resources_are_set(container: dict[str, Any]) -> None:
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]


def test_k8s_service_selects_the_pod(
    k8s: dict[str, dict[str, Any]], container: dict[str, Any]
) -> None:
    labels = k8s["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = k8s["Service"]["spec"]
    assert service["selector"].items() <= labels.items()
    assert k8s["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["ports"]} <= names


# -- compose ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return doc


def compose_file(ref: str) -> Path:
    return (COMPOSE.parent / ref).resolve()


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> host file, for the service's ./relative bind mounts."""
    out = {}
    for spec in service.get("volumes", []):
        src, dst = spec.split(":")[:2]
        if src.startswith("."):
            out[dst] = compose_file(src)
    return out


def test_compose_builds_the_dockerfile(compose: dict[str, Any]) -> None:
    daemon = compose["services"]["enkwatch"]
    build = daemon["build"]
    assert compose_file(build["context"]) / build["dockerfile"] == ROOT / "Dockerfile"
    # the simulator runs the same image
    assert compose["services"]["simulator"]["image"] == daemon["image"]


def test_compose_daemon_config_passes_check_config(compose: dict[str, Any], tmp_path: Path) -> None:
    daemon = compose["services"]["enkwatch"]
    mounts = bind_mounts(daemon)
    env = {k: str(v) for k, v in daemon["environment"].items()}
    out = check_config(mounts[IMAGE_CONFIG].read_text(encoding="utf-8"), tmp_path, env=env)
    assert listen_port(out["admin"]["listen"]) == int(daemon["ports"][0].split(":")[-1])
    assert PurePosixPath(out["state"]["path"]).parent == PurePosixPath(STATE_DIR)
    assert any(v.split(":")[1] == STATE_DIR for v in daemon["volumes"])
    assert daemon["read_only"] is True
    # the key: the compose secret, mounted where api_key_file points
    (secret,) = daemon["secrets"]
    assert out["api"]["api_key_file"] == f"/run/secrets/{secret}"


def test_compose_daemon_watches_the_simulator(compose: dict[str, Any]) -> None:
    daemon, sim = compose["services"]["enkwatch"], compose["services"]["simulator"]
    base = urlsplit(daemon["environment"]["ENKWATCH_API__BASE_URL"])
    args = dict(a.removeprefix("--").split("=", 1) for a in sim["command"][1:])
    assert sim["command"][0] == "simulate"
    assert base.hostname == "simulator" and base.port == int(args["port"])
    assert args["host"] == "0.0.0.0"
    scenario = load_scenario(bind_mounts(sim)[args["scenario"]])
    key_file = compose_file(compose["secrets"]["enkrypt_api_key"]["file"])
    assert scenario.api_key == key_file.read_text(encoding="utf-8").strip()
    # every task of the daemon's config exists in the scenario
    config = yaml.safe_load(bind_mounts(daemon)[IMAGE_CONFIG].read_text(encoding="utf-8"))
    known = {t.task_id for t in scenario.tasks} | {t.dataset for t in scenario.tasks}
    for task in config["tasks"]:
        assert task.get("task_id", task.get("dataset")) in known
    # the image's HEALTHCHECK asks the daemon's admin port, which the simulator has not
    assert sim["healthcheck"]["disable"] is True


# -- systemd ------------------------------------------------------------------------------


def unit_directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_systemd_unit_is_hardened() -> None:
    d = unit_directives()
    assert d.get("DynamicUser") == ["yes"] or "User" in d
    assert d["StateDirectory"] == ["enkwatch"]
    assert d["Restart"] == ["on-failure"]
    assert d["ProtectSystem"] == ["strict"]
    assert d["NoNewPrivileges"] == ["yes"]
    assert "-HUP" in shlex.split(d["ExecReload"][0])
    assert shlex.split(d["ExecStart"][0])[1] == "run"
    # the key: a credential handed to the service, where api_key_file points
    (credential,) = d["LoadCredential"]
    name = credential.split(":")[0]
    assert f"ENKWATCH_API__API_KEY_FILE=%d/{name}" in d["Environment"]


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # the unit names /opt/enkwatch (where the README installs it); verify checks that the
    # executable exists, so the copy runs this interpreter's enkwatch instead
    text = UNIT.read_text(encoding="utf-8")
    exec_start = f"ExecStart={sys.executable} -m enkwatch run"
    text = re.sub(r"^ExecStart=\S+ run", exec_start, text, flags=re.M)
    assert exec_start in text
    unit = tmp_path / "enkwatch.service"
    unit.write_text(text, encoding="utf-8")
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    about_us = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "enkwatch" in ln]
    assert proc.returncode == 0 and not about_us, proc.stdout + proc.stderr
