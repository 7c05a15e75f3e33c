"""The Helm chart through Helm's own engine (helm-python-sdk's libhelm): lint, render with the
default, sidecar-mode and TLS values, validate the rendered core kinds with kubernetes-validate,
run the PrometheusRule's groups through the real `promtool check rules`, and check that the chart's
copies of the dashboards and the rules are the repository's files, byte for byte."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "deltawatch"
DEPLOY = ROOT / "deploy"
PROMTOOL = "/usr/bin/promtool"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion: native gRPC probes are GA in
# 1.27) and the newest schema kubernetes-validate ships. The sidecar Job needs native sidecar
# containers (1.29).
KUBE_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())
JOB_KUBE_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
CORE_KINDS = {
    "Deployment",
    "Service",
    "PersistentVolumeClaim",
    "ServiceAccount",
    "Secret",
    "ConfigMap",
    "Job",
    "NetworkPolicy",
}
SIDECAR_VALUES = yaml.safe_load((DEPLOY / "values-sidecar.yaml").read_text())
MTLS_VALUES = yaml.safe_load((DEPLOY / "values-central-mtls.yaml").read_text())
ALERTMANAGER_VALUES = {
    "serve": {
        "alertmanagerUrls": ["http://am-0.monitoring:9093", "http://am-1.monitoring:9093"],
        "externalUrl": "https://deltawatch.example",
    }
}


def render(values: dict | None = None, *, name: str = "dw", namespace: str = "ml") -> list[dict]:
    """Every object the chart renders with ``values`` (NOTES.txt excluded)."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values=values, name=name, namespace=namespace)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def notes(values: dict | None = None) -> str:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values=values, name="dw", namespace="ml")
    return next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def validate_core(objects: list[dict], versions: tuple[str, ...] = KUBE_VERSIONS) -> None:
    """Every core-kind object against the Kubernetes OpenAPI schemas (strict: no unknown
    fields), oldest supported and newest version."""
    checked = 0
    for obj in objects:
        if obj["kind"] not in CORE_KINDS:
            continue
        for version in versions:
            kubernetes_validate.validate(obj, version, strict=True)
        checked += 1
    assert checked


def container(objects: list[dict]) -> dict:
    (deployment,) = by_kind(objects, "Deployment")
    (main,) = deployment["spec"]["template"]["spec"]["containers"]
    return main


# --- the chart's copies of the dashboards and rules ---------------------------------------------


def test_chart_copies_equal_the_repository_files() -> None:
    originals = sorted((ROOT / "grafana").glob("*.json"))
    copies = sorted((CHART / "files" / "grafana").glob("*.json"))
    assert originals, "grafana/*.json: no dashboards in the repository"
    assert [p.name for p in copies] == [p.name for p in originals], (
        "the chart's dashboards differ from grafana/*.json: run helm/sync-files.sh"
    )
    for original, copy in zip(originals, copies, strict=True):
        assert copy.read_bytes() == original.read_bytes(), (
            f"{copy} is stale: run helm/sync-files.sh"
        )
    rules = ROOT / "prometheus" / "deltawatch-rules.yml"
    copy = CHART / "files" / "prometheus" / "deltawatch-rules.yml"
    assert copy.read_bytes() == rules.read_bytes(), f"{copy} is stale: run helm/sync-files.sh"
    check = subprocess.run([str(ROOT / "helm" / "sync-files.sh"), "--check"], capture_output=True)
    assert check.returncode == 0, check.stdout.decode()


# --- lint ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values", [None, SIDECAR_VALUES, MTLS_VALUES], ids=["central", "sidecar", "mtls"]
)
def test_lint_is_clean(values: dict | None) -> None:
    report = helm.lint(CHART, values, strict=True, kube_version="v1.27.0")
    assert report["errors"] == []
    # severity 2 = warning, 3 = error; info (e.g. "icon is recommended") is fine
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_chart_packages_and_the_archive_renders_the_same(tmp_path: Path) -> None:
    archive = helm.package(CHART, destination=tmp_path)
    with helm.Chart.load(archive) as packaged, helm.Chart.load(CHART) as source:
        names = sorted(f["name"] for f in packaged.files)
        assert "files/prometheus/deltawatch-rules.yml" in names
        assert packaged.schema == source.schema
        kinds = lambda c: sorted(  # noqa: E731
            (path, [d["kind"] for d in yaml.safe_load_all(text) if d])
            for path, text in c.render(
                values={"auth": {"token": {"value": "t"}}}, name="dw"
            ).items()
            if not path.endswith("NOTES.txt")
        )
        assert kinds(packaged) == kinds(source)


def test_values_schema_refuses_bad_values() -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(chart.values)
        for bad, words in [
            ({"serve": {"device": "tpu"}}, "device"),
            ({"mode": "daemonset"}, "mode"),
            ({"grpcPort": 0}, "grpcPort"),
            ({"serviceMonitor": {"interval": "thirty seconds"}}, "interval"),
            ({"persistance": {"enabled": False}}, "persistance"),
            ({"auth": {"token": {"value": "two words"}}}, "value"),
            ({"serve": {"alertmanagerUrls": ["am:9093"]}}, "alertmanagerUrls"),
        ]:
            with pytest.raises(helm.HelmValuesError, match=words):
                chart.validate_schema(chart.merge_values(bad))


def test_contradictory_values_fail_with_the_fix() -> None:
    with pytest.raises(helm.HelmRenderError, match="tls.existingSecret"):
        render({"tls": {"enabled": True}})
    with pytest.raises(helm.HelmRenderError, match="needs tls.enabled"):
        render({"tls": {"clientCA": {"enabled": True}}})
    with pytest.raises(helm.HelmRenderError, match="needs auth.token.enabled"):
        render({"auth": {"token": {"enabled": False}, "metricsRequireToken": True}})


# --- central mode (default values) --------------------------------------------------------------


def test_central_mode_renders_a_hardened_single_writer_service() -> None:
    objects = render()
    kinds = sorted(o["kind"] for o in objects)
    assert set(kinds) == {
        "ConfigMap",
        "Deployment",
        "PersistentVolumeClaim",
        "PrometheusRule",
        "Secret",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    }
    validate_core(objects)
    (deployment,) = by_kind(objects, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    main = container(objects)
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    assert main["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert main["startupProbe"]["grpc"] == {"port": 50051}  # the standard gRPC health service
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["resources"]["requests"] and main["resources"]["limits"]["memory"]
    args = main["args"]
    assert "--grpc-address=0.0.0.0:50051" in args and "--http-address=0.0.0.0:9400" in args
    assert "--data-dir=/data" in args and "--token-file=/etc/deltawatch/token/token" in args
    assert not any(a.startswith("--tls") for a in args)
    mounts = {m["name"]: m for m in main["volumeMounts"]}
    assert mounts["data"]["mountPath"] == "/data" and mounts["token"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    (pvc,) = by_kind(objects, "PersistentVolumeClaim")
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "10Gi"
    (secret,) = by_kind(objects, "Secret")
    assert volumes["token"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert len(secret["data"]["token"]) > 40  # a random token when none is given
    (service,) = by_kind(objects, "Service")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"grpc": 50051, "http": 9400}
    assert service["spec"]["selector"].items() <= pod_labels(deployment).items()
    (monitor,) = by_kind(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint == {
        "port": "http",
        "path": "/metrics",
        "interval": "30s",
        "scrapeTimeout": "10s",
        "honorLabels": False,
    }
    assert "Bearer $TOKEN" in notes() and "dw-deltawatch.ml.svc:50051" in notes()


def pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"]["labels"]


def test_service_monitor_release_interval_and_timeout_are_configurable() -> None:
    values = {
        "serviceMonitor": {
            "release": "monitoring",
            "interval": "15s",
            "scrapeTimeout": "5s",
            "additionalLabels": {"team": "ml"},
        },
        "prometheusRule": {"release": "rules"},
    }
    objects = render(values)
    (monitor,) = by_kind(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "monitoring"
    assert monitor["metadata"]["labels"]["team"] == "ml"
    assert monitor["spec"]["endpoints"][0]["interval"] == "15s"
    assert monitor["spec"]["endpoints"][0]["scrapeTimeout"] == "5s"
    (rule,) = by_kind(objects, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "rules"
    objects = render({"serviceMonitor": {"enabled": False}, "prometheusRule": {"enabled": False}})
    assert not by_kind(objects, "ServiceMonitor") and not by_kind(objects, "PrometheusRule")


def test_network_policy_admits_trainers_to_grpc_and_monitoring_to_http() -> None:
    assert not by_kind(render(), "NetworkPolicy")
    objects = render({"networkPolicy": {"enabled": True}})
    validate_core(objects)
    (policy,) = by_kind(objects, "NetworkPolicy")
    (deployment,) = by_kind(objects, "Deployment")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels(deployment).items()
    grpc_rule, http_rule = policy["spec"]["ingress"]
    assert grpc_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    assert grpc_rule["from"][0]["podSelector"]["matchLabels"] == {"deltawatch.io/client": "true"}
    assert http_rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert http_rule["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    (policy,) = by_kind(
        render({"networkPolicy": {"enabled": True, "httpFrom": []}}), "NetworkPolicy"
    )
    assert "from" not in policy["spec"]["ingress"][1]  # an empty list admits everyone


def test_prometheus_rule_carries_the_repository_rules_and_promtool_accepts_them(
    tmp_path: Path,
) -> None:
    (rule,) = by_kind(render(), "PrometheusRule")
    original = yaml.safe_load((ROOT / "prometheus" / "deltawatch-rules.yml").read_text())
    assert rule["spec"]["groups"] == original["groups"]
    # Prometheus's own templates reach the operator untouched (not expanded by Helm)
    annotations = [r.get("annotations", {}) for g in rule["spec"]["groups"] for r in g["rules"]]
    assert any("{{ $labels." in a.get("summary", "") for a in annotations)
    rules_file = tmp_path / "rendered-rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    check = subprocess.run([PROMTOOL, "check", "rules", str(rules_file)], capture_output=True)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    assert b"SUCCESS" in check.stdout
    # the repository's promtool unit tests pass against the rules as the chart renders them
    # (Helm re-serialises the YAML: multi-line expressions and quoting must survive it)
    (tmp_path / "deltawatch-rules.yml").write_text(rules_file.read_text())
    unit_tests = tmp_path / "deltawatch-rules.test.yml"
    unit_tests.write_bytes((ROOT / "prometheus" / "deltawatch-rules.test.yml").read_bytes())
    test = subprocess.run(
        [PROMTOOL, "test", "rules", unit_tests.name], capture_output=True, cwd=tmp_path
    )
    assert test.returncode == 0, test.stdout.decode() + test.stderr.decode()


def test_dashboard_configmaps_hold_the_repository_json_verbatim() -> None:
    configmaps = by_kind(render(), "ConfigMap")
    originals = {p.name: p for p in sorted((ROOT / "grafana").glob("*.json"))}
    data = {}
    for cm in configmaps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"]["grafana_folder"] == "deltawatch"
        assert len(cm["metadata"]["name"]) <= 63
        data.update(cm["data"])
    assert sorted(data) == sorted(originals)
    for name, text in data.items():
        assert text == originals[name].read_text(encoding="utf-8")
        json.loads(text)
    configmaps = by_kind(
        render({"dashboards": {"label": "dash", "labelValue": "yes", "folder": "Training"}}),
        "ConfigMap",
    )
    assert all(cm["metadata"]["labels"]["dash"] == "yes" for cm in configmaps)
    assert all(cm["metadata"]["annotations"]["grafana_folder"] == "Training" for cm in configmaps)


def test_tls_mtls_and_metrics_token_values() -> None:
    objects = render(MTLS_VALUES)
    validate_core(objects)
    main = container(objects)
    args = main["args"]
    assert "--tls-cert=/etc/deltawatch/tls/tls.crt" in args
    assert "--tls-key=/etc/deltawatch/tls/tls.key" in args
    assert "--tls-client-ca=/etc/deltawatch/client-ca/ca.crt" in args
    assert "--metrics-require-token" in args
    # kubelet's gRPC probe speaks plaintext only: with TLS, probes use HTTPS
    assert "grpc" not in main["startupProbe"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert main[probe]["httpGet"]["scheme"] == "HTTPS"
    deployment = by_kind(objects, "Deployment")[0]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "deltawatch-tls"
    assert volumes["client-ca"]["secret"]["secretName"] == "deltawatch-tls"
    (monitor,) = by_kind(objects, "ServiceMonitor")
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"]["ca"]["secret"] == {"name": "deltawatch-tls", "key": "ca.crt"}
    assert endpoint["tlsConfig"]["serverName"] == "deltawatch.ml.svc"
    assert endpoint["authorization"]["credentials"] == {"name": "deltawatch-token", "key": "token"}
    # an existing token Secret: no Secret rendered, the pod mounts the given one
    objects = render({"auth": {"token": {"existingSecret": "mine", "secretKey": "t"}}})
    assert not by_kind(objects, "Secret")
    assert "--token-file=/etc/deltawatch/token/t" in container(objects)["args"]
    # no token, no persistence: an emptyDir data dir and a warning in NOTES
    objects = render({"auth": {"token": {"enabled": False}}, "persistence": {"enabled": False}})
    assert not by_kind(objects, "Secret") and not by_kind(objects, "PersistentVolumeClaim")
    assert not any(a.startswith("--token-file") for a in container(objects)["args"])
    text = notes({"auth": {"token": {"enabled": False}}})
    assert "WARNING: auth.token.enabled is false" in text


def test_cert_manager_certificate_names_what_clients_and_prometheus_dial() -> None:
    values = {
        "tls": {
            "enabled": True,
            "clientCA": {"enabled": True},
            "certManager": {
                "enabled": True,
                "issuerRef": {"name": "cluster-ca"},
                "extraDnsNames": ["deltawatch.example.internal"],
            },
        }
    }
    objects = render(values)
    validate_core(objects)
    (certificate,) = by_kind(objects, "Certificate")
    spec = certificate["spec"]
    assert spec["secretName"] == "dw-deltawatch-tls"
    assert spec["issuerRef"] == {
        "name": "cluster-ca",
        "kind": "ClusterIssuer",
        "group": "cert-manager.io",
    }
    assert spec["privateKey"]["rotationPolicy"] == "Always" and "server auth" in spec["usages"]
    (service,) = by_kind(objects, "Service")
    name = service["metadata"]["name"]
    assert {name, f"{name}.ml.svc", "deltawatch.example.internal"} <= set(spec["dnsNames"])
    (deployment,) = by_kind(objects, "Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == spec["secretName"]
    assert volumes["client-ca"]["secret"]["secretName"] == spec["secretName"]
    (monitor,) = by_kind(objects, "ServiceMonitor")
    tls_config = monitor["spec"]["endpoints"][0]["tlsConfig"]
    assert tls_config["ca"]["secret"]["name"] == spec["secretName"]
    assert tls_config["serverName"] in spec["dnsNames"]
    missing_issuer = {"tls": {"enabled": True, "certManager": {"enabled": True}}}
    with pytest.raises(helm.HelmRenderError, match="issuerRef.name"):
        render(missing_issuer)
    assert not by_kind(render(MTLS_VALUES), "Certificate")


def test_alert_config_values_reach_the_alert_engine(tmp_path: Path) -> None:
    """serve.alertConfig becomes a Secret (the webhook headers may hold credentials) mounted as
    --alert-config, and the sidecar's own loader reads it back with the values given."""
    from deltawatch.sidecar.alerts.config import load_alert_config

    settings = {
        "subspace_drift": {"threshold": 0.6},
        "rollup_min_matrices": 2,
        "webhook": {"headers": {"Authorization": "Bearer receiver-token"}},
    }
    objects = render({"serve": {"alertConfig": settings}})
    validate_core(objects)
    assert not any("alerts.yaml" in o.get("data", {}) for o in by_kind(objects, "ConfigMap"))
    (secret,) = [o for o in by_kind(objects, "Secret") if "alerts.yaml" in o["data"]]
    main = container(objects)
    assert "--alert-config=/etc/deltawatch/alerts/alerts.yaml" in main["args"]
    mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    assert mounts["alert-config"] == "/etc/deltawatch/alerts"
    (deployment,) = by_kind(objects, "Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["alert-config"]["secret"]["secretName"] == secret["metadata"]["name"]
    path = tmp_path / "alerts.yaml"
    path.write_bytes(base64.b64decode(secret["data"]["alerts.yaml"]))
    config = load_alert_config(path)
    assert config.subspace_drift.threshold == 0.6 and config.rollup_min_matrices == 2
    assert dict(config.webhook.headers) == {"Authorization": "Bearer receiver-token"}
    assert not any(a.startswith("--alert-config") for a in container(render())["args"])
    objects = render({"serve": {"alertConfigExistingSecret": "my-alerts"}})
    assert "--alert-config=/etc/deltawatch/alerts/alerts.yaml" in container(objects)["args"]
    (deployment,) = by_kind(objects, "Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["alert-config"]["secret"]["secretName"] == "my-alerts"
    assert not [o for o in by_kind(objects, "Secret") if "alerts.yaml" in o["data"]]


# --- sidecar mode -------------------------------------------------------------------------------


def test_alertmanager_values_become_serve_flags() -> None:
    """serve.alertmanagerUrls (one --alertmanager-url each) and serve.externalUrl reach
    ServeConfig; none by default."""
    from deltawatch.sidecar import cli

    args = container(render(ALERTMANAGER_VALUES))["args"]
    assert [a for a in args if a.startswith(("--alertmanager-url", "--external-url"))] == [
        "--alertmanager-url=http://am-0.monitoring:9093",
        "--alertmanager-url=http://am-1.monitoring:9093",
        "--external-url=https://deltawatch.example",
    ]
    namespace = cli.build_parser(with_demo=False).parse_args(["serve", *args])
    namespace.token_file = None
    config = cli.serve_config(namespace, environ={})
    assert config.alertmanager_url == ("http://am-0.monitoring:9093", "http://am-1.monitoring:9093")
    assert config.external_url == "https://deltawatch.example"
    assert not [a for a in container(render())["args"] if "alertmanager" in a]


def test_sidecar_mode_renders_only_the_shared_objects() -> None:
    objects = render(SIDECAR_VALUES, name="deltawatch")
    kinds = {o["kind"] for o in objects}
    assert kinds == {"ConfigMap", "PodMonitor", "PrometheusRule", "Secret"}
    validate_core(objects)
    (monitor,) = by_kind(objects, "PodMonitor")
    assert monitor["spec"]["selector"] == {"matchLabels": {"deltawatch.io/sidecar": "true"}}
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "deltawatch-http"
    assert monitor["spec"]["podMetricsEndpoints"][0]["interval"] == "15s"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert "127.0.0.1:50051" in notes(SIDECAR_VALUES)


def test_sidecar_job_example_fits_the_chart() -> None:
    """deploy/sidecar-job.yaml: valid, the sidecar in the training pod, the trainer on localhost,
    and the names agree with what the chart renders in sidecar mode."""
    docs = [d for d in yaml.safe_load_all((DEPLOY / "sidecar-job.yaml").read_text()) if d]
    (job,) = docs
    validate_core([job], JOB_KUBE_VERSIONS)
    pod = job["spec"]["template"]
    (sidecar,) = pod["spec"]["initContainers"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar: the Job ends with the trainer
    (trainer,) = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in trainer["env"]}
    assert env["DELTAWATCH_ENDPOINT"] == "127.0.0.1:50051"
    assert "--grpc-address=127.0.0.1:50051" in sidecar["args"]  # ingest never leaves the pod
    objects = render(SIDECAR_VALUES, name="deltawatch")
    (monitor,) = by_kind(objects, "PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
    assert port in {p["name"] for p in sidecar["ports"]}
    (secret,) = by_kind(objects, "Secret")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["deltawatch-token"]["secret"]["secretName"] == secret["metadata"]["name"]
    token_file = next(a.split("=", 1)[1] for a in sidecar["args"] if a.startswith("--token-file="))
    assert env["DELTAWATCH_TOKEN_FILE"] == token_file
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True


# --- Pod Security Standards ---------------------------------------------------------------------


def assert_restricted(pod: dict) -> None:
    """The Pod Security Standards' "restricted" profile (the checks that apply to these pods):
    no host namespaces or hostPath, non-root, no privilege escalation, all capabilities dropped,
    seccomp RuntimeDefault, plus a read-only root filesystem for deltawatch's own container."""
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    assert not any("hostPath" in v for v in pod.get("volumes", []))
    pod_sc = pod.get("securityContext", {})
    for c in pod.get("initContainers", []) + pod["containers"]:
        sc = c.get("securityContext", {})
        assert sc.get("privileged") is not True, c["name"]
        assert sc.get("allowPrivilegeEscalation") is False, c["name"]
        assert "ALL" in sc.get("capabilities", {}).get("drop", []), c["name"]
        assert set(sc.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}, c["name"]
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, c["name"]
        assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, c["name"]
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
        assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), c["name"]
        if c["name"] == "deltawatch":
            assert sc.get("readOnlyRootFilesystem") is True


def test_pods_meet_the_restricted_pod_security_standard() -> None:
    for values in (None, MTLS_VALUES, {"persistence": {"enabled": False}}):
        (deployment,) = by_kind(render(values), "Deployment")
        assert_restricted(deployment["spec"]["template"]["spec"])
    job = yaml.safe_load((DEPLOY / "sidecar-job.yaml").read_text())
    assert_restricted(job["spec"]["template"]["spec"])


# --- the image ----------------------------------------------------------------------------------


def test_dockerfile_is_non_root_with_index_urls_as_bare_build_args() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines()]
    args = {line.split()[1].split("=")[0] for line in lines if line.startswith("ARG ")}
    assert {"BASE_IMAGE", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "TORCH_INDEX_URL"} <= args
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "TORCH_INDEX_URL"):
        assert f"ARG {name}" in lines and not any(ln.startswith(f"ARG {name}=") for ln in lines)
    assert "://" not in "\n".join(line for line in lines if not line.startswith("#"))
    users = [line for line in lines if line.startswith("USER ")]
    assert users and users[-1] == "USER 10001:10001"
    assert 'ENTRYPOINT ["deltawatch", "serve"]' in lines
    ignore = (ROOT / ".dockerignore").read_text().split()
    # every COPY source from the build context exists and is let through by .dockerignore
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is missing"
                allowed = f"!{source}/" if (ROOT / source).is_dir() else f"!{source}"
                assert allowed in ignore, f".dockerignore keeps {source} out of the context"


def test_rendered_and_example_flags_are_real_serve_flags() -> None:
    """Every argument the chart and the sidecar Job pass parses as a `deltawatch serve` flag and
    gives a valid ServeConfig (files aside: they exist only in the pod)."""
    from deltawatch.sidecar import cli

    parser = cli.build_parser(with_demo=False)
    job = yaml.safe_load((DEPLOY / "sidecar-job.yaml").read_text())
    arg_lists = [
        container(render())["args"],
        container(render(MTLS_VALUES))["args"],
        container(
            render({"serve": {"alertWebhook": "http://am:9093/hook", "alertConfig": {"a": 1}}})
        )["args"],
        container(render(ALERTMANAGER_VALUES))["args"],
        job["spec"]["template"]["spec"]["initContainers"][0]["args"],
    ]
    for args in arg_lists:
        namespace = parser.parse_args(["serve", *args])
        for name in ("token_file", "tls_cert", "tls_key", "tls_client_ca", "alert_config"):
            setattr(namespace, name, None)
        config = cli.serve_config(namespace, environ={})
        assert config.data_dir == "/data"
