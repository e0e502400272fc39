"""deploy/: images linted (hadolint), Kubernetes manifests validated (kubernetes-validate), the
Grafana dashboard queries only metrics a live server exports, Prometheus configs pass promtool.

No Docker engine or cluster is needed: these are the checks CI can run on a plain machine.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda"]
K8S_CORE = ["deployment.yaml", "service.yaml", "pvc.yaml", "secret.example.yaml"]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (it comes with `make install`)")
    return path


def _run(*cmd, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=120)


# ------------------------------------------------------------------------------------ images
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    out = _run(_tool("hadolint"), "--no-color", str(dockerfile))
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_really_lints(tmp_path):
    """Guard against a vacuous pass: an unpinned, root, apt-without-cleanup file must fail."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install -y curl\nRUN pip install requests\n")
    out = _run(_tool("hadolint"), "--no-color", str(bad))
    assert out.returncode != 0 and "DL3006" in out.stdout  # untagged base image


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_shape(dockerfile):
    text = dockerfile.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(froms) >= 2, "multi-stage: a build stage and a slim runtime stage"
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M).group(1)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), f"base image not pinned to a patch release: {base}"
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0"), "the runtime runs as a non-root user"
    assert re.search(r"HEALTHCHECK .*\n?.*/ready", text), "health check on /ready"
    volumes = json.loads(re.search(r"^VOLUME\s+(\[.*\])", text, re.M).group(1))
    assert "/var/cache/peftserve" in volumes and "/var/lib/peftserve" in volumes, "model cache and store apart"
    for line in re.findall(r"pip install[^\n\\]*(?:\\\n[^\n\\]*)*", text):
        pins = "-c deploy/requirements.lock" in line or re.search(r"==\d", line)
        assert pins, f"unpinned install: {line}"
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") if "*" in ignore else 0] == "*" and "!server/" in ignore, \
        "the build context is an allow-list"


# ------------------------------------------------------------------------------- kubernetes
def test_kubernetes_manifests_validate():
    files = [str(DEPLOY / "k8s" / f) for f in K8S_CORE]
    out = _run(_tool("kubernetes-validate"), "--strict", "--quiet", *files)
    assert out.returncode == 0, out.stdout + out.stderr


def test_kubernetes_validate_really_validates(tmp_path):
    doc = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = {"not": "a port"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    out = _run(_tool("kubernetes-validate"), "--strict", "--quiet", str(bad))
    assert out.returncode != 0, "an invalid Deployment passed validation"


def test_deployment_matches_the_server_contract():
    dep = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    args = c["args"]
    drain = float(args[args.index("--drain-timeout") + 1])
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    pre_stop = float(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > drain + pre_stop, "the kubelet would kill a draining pod"
    env = {e["name"]: e for e in c["env"]}
    for key in ("PEFTSERVE_API_KEY", "PEFTSERVE_ADMIN_KEY"):
        assert "secretKeyRef" in env[key]["valueFrom"], f"{key} must come from a Secret"
    store = args[args.index("--adapter-store") + 1]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    claim = {v["name"]: v for v in pod["volumes"]}["adapters"]["persistentVolumeClaim"]["claimName"]
    assert store.startswith(mounts["adapters"]) and claim == "peftserve-adapters"
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    monitor = yaml.safe_load((DEPLOY / "k8s" / "servicemonitor.yaml").read_text())
    service = yaml.safe_load((DEPLOY / "k8s" / "service.yaml").read_text())
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


# ------------------------------------------------------------------------- observability
def _dashboard_module():
    sys.path.insert(0, str(DEPLOY / "grafana"))
    try:
        import make_dashboard
    finally:
        sys.path.pop(0)
    return make_dashboard


def test_dashboard_file_is_generated_from_its_script():
    assert json.loads((DEPLOY / "grafana" / "peftserve.json").read_text()) == _dashboard_module().dashboard(), \
        "run python deploy/grafana/make_dashboard.py"


def _live_metrics(adapter_server, lib) -> str:
    """/metrics of a server that served the base and a LoRA (so labelled series exist)."""
    server = adapter_server(max_adapters_per_batch=1)
    art = lib.get("qv")
    server.registry.add("qv", art.config, art.weights)
    art2 = lib.get("mlp")
    server.registry.add("mlp", art2.config, art2.weights)

    async def go():
        async with server.client() as c:
            for adapter in (None, "qv", "mlp", "qv"):  # one device slot: loads and an eviction
                body = {"input_ids": [5, 6, 7], "max_new_tokens": 2, **({"adapter": adapter} if adapter else {})}
                assert (await c.post("/generate", json=body)).status_code == 200
            return (await c.get("/metrics")).text

    return asyncio.run(go())


def test_every_dashboard_metric_is_exported(adapter_server, lib):
    text = _live_metrics(adapter_server, lib)
    exported = {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][\w:]*)[{ ]", text, re.M)}
    dash = json.loads((DEPLOY / "grafana" / "peftserve.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m.group(1) for e in exprs for m in re.finditer(r"\b(peftserve_\w+)", e)}
    assert len(used) >= 15
    missing = sorted(used - exported)
    assert not missing, f"the dashboard queries metrics /metrics does not export: {missing}"
    if shutil.which("promtool"):
        # vLLM-compatible aliases keep vLLM's `vllm:` names on purpose (routers read them);
        # promtool's lint reserves ':' for recording rules, so it checks our own names only
        ours = "\n".join(line for line in text.splitlines() if "vllm:" not in line) + "\n"
        out = _run("promtool", "check", "metrics", input=ours)
        assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("config", [DEPLOY / "prometheus.yml", DEPLOY / "compose" / "prometheus.yml"],
                         ids=["systemd", "compose"])
def test_prometheus_configs_pass_promtool(config):
    if not shutil.which("promtool"):
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    out = _run("promtool", "check", "config", str(config))
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_wires_server_prometheus_and_grafana():
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"peftserve", "prometheus", "grafana"} <= services.keys()
    server = services["peftserve"]
    assert server["build"]["dockerfile"] == "deploy/Dockerfile"
    assert {v.split(":")[1] for v in server["volumes"]} == {"/var/cache/peftserve", "/var/lib/peftserve"}
    scrape = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["peftserve:8000"]
    mounts = " ".join(services["grafana"]["volumes"])
    assert "peftserve.json" in mounts and "provisioning" in mounts
    for rel in ("provisioning/datasources/prometheus.yml", "provisioning/dashboards/peftserve.yml"):
        assert yaml.safe_load((DEPLOY / "grafana" / rel).read_text())["apiVersion"] == 1


from tests.test_adapters_api import adapter_server, lib  # noqa: E402,F401  (fixtures)
