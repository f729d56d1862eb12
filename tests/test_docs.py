"""The documentation, as written: README.md and docs/*.md.

The README stays a front page; every relative link resolves; every YAML block is accepted by
what it configures (`enkwatch check-config`, the simulator's scenario loader, the manifests
it shows); every shell command is either run here as written or listed with why it cannot
run here; the Kubernetes kustomizations render and agree with their Secrets and ConfigMaps;
and `enkwatch demo` tells exactly the story the README tells.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from enkwatch.simulator import load_scenario
from tests.kit import Spawn, free_port, invoke

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
SHARED_CONTRACT = ROOT.parent / "shared" / "CONTRACT.md"
KUSTOMIZATIONS = [ROOT / "deploy" / "kubernetes", ROOT / "deploy" / "kubernetes-replicas"]

TWO_COMMANDS = "pip install . && enkwatch demo\npip install '.[test]' && python -m pytest"


# -- reading the pages ----------------------------------------------------------------------


def fenced(path: Path, *langs: str) -> list[str]:
    """The fenced code blocks of a page whose info string is one of `langs`."""
    out: list[str] = []
    lang: str | None = None
    body: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if lang is None:
            if stripped.startswith("```"):
                lang, body = stripped[3:].strip(), []
        elif stripped == "```":
            if lang in langs:
                out.append("\n".join(body) + "\n")
            lang = None
        else:
            body.append(line)
    return out


def prose(path: Path) -> str:
    """The page without its fenced code blocks."""
    out, inside = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("```"):
            inside = not inside
        elif not inside:
            out.append(line)
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = defaultdict(int)
    out = set()
    for line in prose(path).splitlines():
        if m := re.match(r"^#{1,6} (.+)$", line):
            base = slug(m.group(1))
            out.add(base if not seen[base] else f"{base}-{seen[base]}")
            seen[base] += 1
    return out


def _cut_comment(line: str) -> str:
    """`line` up to an unquoted ` #` comment."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def shell_commands(path: Path) -> list[str]:
    """Every command of the page's sh blocks: continuations joined, comments cut, `&&` split."""
    out: list[str] = []
    for block in fenced(path, "sh"):
        joined = re.sub(r"\\\n\s*", "", block)
        for line in joined.splitlines():
            command = _cut_comment(line).strip()
            out.extend(part.strip() for part in command.split(" && ") if part.strip())
    return out


def all_commands() -> dict[str, list[str]]:
    found: dict[str, list[str]] = defaultdict(list)
    for page in PAGES:
        for command in shell_commands(page):
            found[command].append(page.relative_to(ROOT).as_posix())
    return found


def enkwatch_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENKWATCH_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def check_config(text: str, tmp_path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    proc = invoke(
        # --file-only: the key files and state paths a manifest names exist where it runs
        "check-config",
        "--file-only",
        "--config",
        str(path),
        env=enkwatch_env(ENKRYPTAI_API_KEY="sk-docs-test", **(env or {})),
    )
    assert proc.returncode == 0, f"{proc.stderr}\n--- the config:\n{text}"
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


# -- the front page, links, the contract ----------------------------------------------------


def test_readme_is_a_front_page() -> None:
    assert README.stat().st_size < 10 * 1024, "the README is a front page: move detail to docs/"
    first = fenced(README, "sh")[0]
    assert first == TWO_COMMANDS + "\n", "the README opens with the two set-up commands"
    before = README.read_text(encoding="utf-8").split("```", 1)[0]
    assert before.strip() == "# enkwatch", "nothing comes before them but the title"


def test_every_relative_link_resolves() -> None:
    checked = 0
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(page)):
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            name = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
            checked += 1
            assert dest.exists(), f"{page.name}: the link {target} points at nothing"
            if anchor:
                assert anchor in anchors(dest), f"{page.name}: no heading #{anchor} in {name}"
    assert checked >= 10


def test_every_docs_page_is_linked_from_the_readme() -> None:
    text = README.read_text(encoding="utf-8")
    for page in DOCS.glob("*.md"):
        assert f"(docs/{page.name})" in text, f"README does not link docs/{page.name}"


def test_the_contract_ships_with_the_repository() -> None:
    note, _, body = (DOCS / "contract.md").read_text(encoding="utf-8").partition("\n\n")
    assert "public interface" in note and "\n" not in note
    if SHARED_CONTRACT.exists():  # the project's copy, beside the repository
        assert body == SHARED_CONTRACT.read_text(encoding="utf-8"), "docs/contract.md drifted"
    assert "[docs/contract.md](docs/contract.md)" in README.read_text(encoding="utf-8")


# -- every YAML block ------------------------------------------------------------------------


def yaml_blocks() -> list[tuple[str, int, str]]:
    return [
        (page.relative_to(ROOT).as_posix(), i, block)
        for page in PAGES
        for i, block in enumerate(fenced(page, "yaml"))
    ]


def deploy_texts() -> dict[str, str]:
    return {
        p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8")
        for p in (ROOT / "deploy").rglob("*.yaml")
    }


@pytest.mark.parametrize(("page", "index", "block"), yaml_blocks())
def test_every_yaml_block_is_accepted(page: str, index: int, block: str, tmp_path: Path) -> None:
    doc = yaml.safe_load(block)
    assert isinstance(doc, dict), f"{page} block {index}: not a YAML mapping"
    if block.startswith("# prometheus.yml"):
        # a scrape config and alert rules: every metric they use is one enkwatch exports
        source = (ROOT / "daemon" / "enkwatch" / "metrics.py").read_text(encoding="utf-8")
        exprs = [rule["expr"] for group in doc["groups"] for rule in group["rules"]]
        for metric in re.findall(r"enkwatch_\w+", " ".join(exprs)):
            name = metric.removesuffix("_total")  # the client adds _total to counters
            assert f'"{name}"' in source, f"{page}: {metric} is not a metric of enkwatch"
    elif "apiVersion" in doc:
        # a manifest shown in the docs is a file of deploy/, verbatim
        assert block in deploy_texts().values(), f"{page} block {index}: not a deploy/ file"
    elif any("timeline" in t for t in doc.get("tasks", [])):
        path = tmp_path / "scenario.yaml"
        path.write_text(block, encoding="utf-8")
        assert load_scenario(path).tasks
    else:
        check_config(block, tmp_path)


# -- every shell command ---------------------------------------------------------------------

# A command that cannot run inside the test suite, by its first words, with why. Each one is
# exercised another way where it can be (named in the reason).
NOT_RUNNABLE: dict[str, str] = {
    "pip install": "reinstalls the package under test; .ci/run installs it as written",
    "python -m pytest": "this test suite itself; .ci/run runs it as written",
    "export ": "sets a variable for the commands after it",
    "enkwatch run --config config/example.yaml": (
        "polls the real API (api.enkryptai.com); only 127.0.0.1 is reachable here. The config "
        "passes check-config below, and `run` is tested against the simulator in test_e2e"
    ),
    "enkwatch watch": (
        "watches a real task on the real API; `watch` is tested against the simulator in "
        "test_e2e.py::test_watch"
    ),
    "enkwatch migrate-state": (
        "needs $DATABASE_URL; test_pgstore.py::test_migrate_state_from_sqlite runs it against "
        "its own PostgreSQL"
    ),
    "docker ": "no container engine inside pytest; scripts/container-smoke runs the image in CI",
    "kubectl ": "no cluster here; the kustomizations are rendered and cross-checked below",
    "python3 -m venv /opt/enkwatch": "installs into the machine (systemd set-up)",
    "/opt/enkwatch/bin/pip install": "installs into the machine (systemd set-up)",
    "install ": "writes to /etc (systemd set-up); test_deploy verifies the unit",
    "printf '%s\\n' \"$YOUR_KEY\"": "writes the key to /etc (systemd set-up)",
    "systemctl ": "needs a running systemd; test_deploy runs systemd-analyze verify",
    "journalctl ": "needs a running systemd",
    "python -m bench": "minutes of full load on a shared machine; test_bench runs --smoke",
    "enkwatch tasks": "needs a running daemon or its state; test_taskcmds_e2e runs it on both",
    "enkwatch add": "needs a running daemon; test_taskcmds_e2e runs it against one",
    "enkwatch remove": "needs a running daemon; test_taskcmds_e2e runs it against one",
    "enkwatch forget": "needs a daemon or its state; test_taskcmds_e2e runs it on both",
}

# Run here as written by the test named.
RUN_HERE: dict[str, str] = {
    "enkwatch demo": "test_demo_tells_the_readme_story",
    "enkwatch check-config --config config/example.yaml": "test_commands_that_run_here",
    "ENKWATCH_API__BASE_URL=http://127.0.0.1:8080 enkwatch status --dataset Election2": (
        "test_commands_that_run_here"
    ),
}
# curl against the admin port of a running daemon (port 9090 in the docs)
CURL_PREFIX = "curl "


def test_every_shell_command_is_run_or_excused() -> None:
    for command, pages in all_commands().items():
        if command in RUN_HERE or command.startswith(CURL_PREFIX):
            continue
        reasons = [why for prefix, why in NOT_RUNNABLE.items() if command.startswith(prefix)]
        assert reasons, f"{pages}: `{command}` is neither run by a test nor listed as not runnable"


def bash(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


async def test_commands_that_run_here(enkwatch: Spawn) -> None:
    commands = all_commands()
    for command in RUN_HERE:
        assert command in commands, f"`{command}` is no longer in the docs: update RUN_HERE"
    proc = await asyncio.to_thread(
        # as the docs say it: after `export ENKRYPTAI_API_KEY=...`
        bash,
        "enkwatch check-config --config config/example.yaml",
        enkwatch_env(ENKRYPTAI_API_KEY="sk-docs-test"),
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tasks"]
    # status against the simulator the docs name: `enkwatch simulate` on its default port
    status = "ENKWATCH_API__BASE_URL=http://127.0.0.1:8080 enkwatch status --dataset Election2"
    port = 8080
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:  # busy on this machine: the same command on another port
            port = free_port()
    sim = await enkwatch("simulate", "--port", str(port), json_lines=False)
    try:
        listening = await sim.wait_for(lambda e: True, "the simulator's first line", 30)
        assert listening["event"] == "simulator.listening"
        proc = await asyncio.to_thread(
            bash, status.replace(":8080", f":{port}"), enkwatch_env(ENKRYPTAI_API_KEY="k")
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["dataset_name"] == "Election2"
    finally:
        sim.send(signal.SIGTERM)
        await sim.wait_exit(10)


async def test_curl_commands_against_a_running_daemon(tmp_path: Path, enkwatch: Spawn) -> None:
    curls = [c for c in all_commands() if c.startswith(CURL_PREFIX)]
    assert curls
    if not (shutil.which("curl") and shutil.which("jq")):
        pytest.skip("curl and jq are needed to run the docs' curl commands as written")
    port = free_port()
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "api": {"base_url": "http://127.0.0.1:9"},  # nothing listens: polls just fail
                "state": {"path": ":memory:"},
                "admin": {"listen": f"127.0.0.1:{port}"},
                "tasks": [],
            }
        ),
        encoding="utf-8",
    )
    env = enkwatch_env(ENKRYPTAI_API_KEY="k", ENKWATCH_ADMIN_TOKEN="docs-token")
    daemon = await enkwatch(
        "run", "--config", str(config), ENKRYPTAI_API_KEY="k", ENKWATCH_ADMIN_TOKEN="docs-token"
    )
    try:
        await daemon.wait_for(lambda e: e["event"] == "daemon.started", "daemon.started", 30)
        for command in curls:
            proc = await asyncio.to_thread(
                bash, command.replace("localhost:9090", f"127.0.0.1:{port}"), env
            )
            assert proc.returncode == 0, f"{command}: {proc.stderr}"
            assert proc.stdout.strip(), command
            if "jq" not in command:
                json.loads(proc.stdout)
        listing = await asyncio.to_thread(bash, f"curl -s 127.0.0.1:{port}/tasks", env)
        listed = json.loads(listing.stdout)["tasks"]
        added = {t["task_key"] for t in listed}
        assert "dataset:Election2" in added, "the POST of the docs added its task"
    finally:
        daemon.send(signal.SIGTERM)
        await daemon.wait_exit(30)


# -- Kubernetes: the kustomizations, rendered ----------------------------------------------

_MERGE_KEYS = {"volumeMounts": "mountPath", "ports": "containerPort"}


def _merge(base: Any, patch: Any, field: str = "") -> Any:
    """A strategic merge patch, as far as the manifests here use it."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = _merge(base[key], value, key) if key in base else value
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(x, dict) for x in base + patch)
    ):
        key = _MERGE_KEYS.get(field, "name")
        out_list = [dict(x) for x in base]
        added: list[Any] = []  # items only in the patch come first, as kustomize puts them
        for item in patch:
            match = [i for i, x in enumerate(out_list) if x.get(key) == item.get(key)]
            if item.get("$patch") == "delete":
                assert match, f"{field}: nothing to delete with {key} {item.get(key)}"
                del out_list[match[0]]
            elif match:
                out_list[match[0]] = _merge(out_list[match[0]], item, field)
            else:
                added.append(item)
        return added + out_list
    return copy.deepcopy(patch)


def _ident(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """Build a kustomization in Python: resources, patches, labels, images."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    known = {"apiVersion", "kind", "resources", "patches", "labels", "images"}
    assert set(spec) <= known, f"{directory}: {set(spec) - known} is not built here"
    objects: list[dict[str, Any]] = []
    for ref in spec["resources"]:
        path = (directory / ref).resolve()
        if path.is_dir():
            objects.extend(kustomize(path))
        else:
            docs = yaml.safe_load_all(path.read_text(encoding="utf-8"))
            objects.extend(d for d in docs if d)
    for patch_ref in spec.get("patches", []):
        patch = yaml.safe_load((directory / patch_ref["path"]).read_text(encoding="utf-8"))
        (i,) = [i for i, o in enumerate(objects) if _ident(o) == _ident(patch)]
        if patch.get("$patch") == "delete":
            del objects[i]
        else:
            objects[i] = _merge(objects[i], patch)
    for label in spec.get("labels", []):
        assert label.get("includeSelectors") is False
        for obj in objects:
            obj["metadata"] = {**obj["metadata"]}
            obj["metadata"]["labels"] = {**obj["metadata"].get("labels", {}), **label["pairs"]}
    for image in spec.get("images", []):
        for obj in objects:
            if obj["kind"] != "Deployment":
                continue
            for c in obj["spec"]["template"]["spec"]["containers"]:
                if c["image"].partition(":")[0] == image["name"]:
                    c["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return objects


@pytest.fixture(params=KUSTOMIZATIONS, ids=lambda p: p.name)
def rendered(request: pytest.FixtureRequest) -> dict[tuple[str, str], dict[str, Any]]:
    return {_ident(o): o for o in kustomize(request.param)}


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl is not installed")
def test_python_rendering_is_kubectls(directory: Path) -> None:
    proc = subprocess.run(
        ["kubectl", "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    theirs = {_ident(o): o for o in yaml.safe_load_all(proc.stdout) if o}
    ours = {_ident(o): o for o in kustomize(directory)}
    assert ours == theirs


def _keys(obj: dict[str, Any]) -> set[str]:
    return set(obj.get("stringData", {})) | set(obj.get("data", {}))


def test_every_referenced_key_exists(rendered: dict[tuple[str, str], dict[str, Any]]) -> None:
    ((_, name),) = [k for k in rendered if k[0] == "Deployment"]
    pod = rendered["Deployment", name]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for v in volumes.values():
        if "secret" in v:
            secret = rendered["Secret", v["secret"]["secretName"]]
            assert {i["key"] for i in v["secret"].get("items", [])} <= _keys(secret)
        if "configMap" in v:
            cm = rendered["ConfigMap", v["configMap"]["name"]]
            assert {i["key"] for i in v["configMap"].get("items", [])} <= _keys(cm)
        if "persistentVolumeClaim" in v:
            assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in rendered
    for container in pod["containers"]:
        assert {m["name"] for m in container["volumeMounts"]} <= set(volumes)
        for env in container.get("env", []):
            for kind, ref_name in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                ref = env.get("valueFrom", {}).get(ref_name)
                if ref:
                    assert (kind, ref["name"]) in rendered, f"{env['name']}: no {kind}"
                    assert ref["key"] in _keys(rendered[kind, ref["name"]]), env["name"]


def test_every_deployment_runs_a_config_enkwatch_accepts(
    rendered: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    ((_, name),) = [k for k in rendered if k[0] == "Deployment"]
    pod = rendered["Deployment", name]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["run"]
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif ref := item["valueFrom"].get("secretKeyRef"):
            secret = rendered["Secret", ref["name"]]
            env[item["name"]] = str(secret.get("stringData", {})[ref["key"]])
    # the config file the daemon reads: the ConfigMap item mounted at $ENKWATCH_CONFIG
    config_path = PurePosixPath(env.pop("ENKWATCH_CONFIG"))
    mounts = {m["name"]: PurePosixPath(m["mountPath"]) for m in container["volumeMounts"]}
    files: dict[PurePosixPath, tuple[str, str, str]] = {}
    for v in pod["volumes"]:
        for kind, field, ref in (
            ("ConfigMap", "configMap", "name"),
            ("Secret", "secret", "secretName"),
        ):
            if field in v and v["name"] in mounts:
                for item in v[field]["items"]:
                    files[mounts[v["name"]] / item["path"]] = (kind, v[field][ref], item["key"])
    kind, cm_name, key = files[config_path]
    assert kind == "ConfigMap"
    text = rendered["ConfigMap", cm_name]["data"][key]
    env.pop("ENKWATCH_ADMIN_TOKEN", None)  # not a config key
    out = check_config(text, tmp_path, env=env)
    # the API key file the config names is a mounted Secret key
    key_file = PurePosixPath(out["api"]["api_key_file"])
    assert key_file in files and files[key_file][0] == "Secret", f"{key_file} is not mounted"
    if "ENKWATCH_STATE__PATH" in env:
        assert out["state"]["path"].startswith("postgresql://")


def test_documented_kubectl_secrets_have_the_manifests_keys() -> None:
    secrets: dict[str, set[str]] = {}
    for directory in KUSTOMIZATIONS:
        for obj in kustomize(directory):
            if obj["kind"] == "Secret":
                secrets[obj["metadata"]["name"]] = _keys(obj)
    texts = [c for c in all_commands() if c.startswith("kubectl create secret generic")]
    for path in (ROOT / "deploy").rglob("secret*.yaml"):  # the commands in their comments
        joined = re.sub(r"\\\n#\s*", "", path.read_text(encoding="utf-8"))
        texts += [ln.lstrip("# ").strip() for ln in joined.splitlines() if "create secret" in ln]
    assert len(texts) >= 3
    for text in texts:
        words = shlex.split(text)
        name = words[4]
        keys = {
            w.split("=", 2)[1] for w in words if w.startswith(("--from-file=", "--from-literal="))
        }
        assert name in secrets, f"`{text}` creates a Secret no manifest uses"
        assert keys == secrets[name], f"`{text}`: keys {keys}, the manifests' {secrets[name]}"


# -- the demo's story ------------------------------------------------------------------------

FLAKY = "SupportBot"


def test_demo_tells_the_readme_story() -> None:
    proc = invoke("demo", env=enkwatch_env())
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    story: dict[str, list[tuple[str, ...]]] = defaultdict(list)
    for e in events:
        name = e.get("dataset") or e.get("test_name") or e.get("run_id")
        if e["event"] == "task.transition":
            story[name].append(("transition", e["previous_status"], e["status"]))
        elif e["event"].startswith("task."):
            story[name].append((e["event"], e.get("error", ""), str(e.get("http_status"))))
    walk = [("transition", None, "Queued"), ("transition", "Queued", "Running")]
    failures = [
        ("task.poll_failed", "http_status", "500"),
        ("task.poll_failed", "http_status", "500"),
        ("task.poll_failed", "rate_limited", "429"),
    ]
    assert dict(story) == {
        "Election2": [*walk, ("transition", "Running", "Finished")],
        "FinanceQA": [*walk, ("transition", "Running", "Failed")],
        FLAKY: [*failures, *walk, ("transition", "Running", "Finished")],
        "MedicalAdvice": [*walk, ("transition", "Running", "Finished")],
        # then a red-team test and a run, and a red-team test found through the list pages
        "nightly-safety": [*walk, ("transition", "Running", "Finished")],
        "rt-0f1c2d3e-0006-4a5b-9c8d-000000000006": [*walk, ("transition", "Running", "Finished")],
        "nightly-found-jailbreak": [
            ("task.discovered", "", "None"),
            *walk,
            ("transition", "Running", "Finished"),
        ],
    }
    rate_limited = [e for e in events if e.get("error") == "rate_limited"]
    assert [e["retry_in_seconds"] for e in rate_limited] == [1.0], "Retry-After: 1 honoured"
    assert [e["event"] for e in events[-3:]] == [
        "daemon.all_done",
        "daemon.stopping",
        "daemon.stopped",
    ]
    assert (events[-3]["finished"], events[-3]["failed"], events[-3]["gave_up"]) == (6, 1, 0)
    readme = " ".join(README.read_text(encoding="utf-8").split())
    assert "Four dataset tasks each go Queued -> Running -> Finished, except FinanceQA" in readme
    assert "So do a red-team test and a red-team run, and a third red-team test" in readme
    assert f"the flaky {FLAKY} is first answered with two server errors and a rate limit" in readme
