"""The chart's scrape settings against the real Prometheus and the real `deltawatch serve`.

The ServiceMonitor the chart renders for TLS + a token on /metrics (deploy/values-central-mtls.yaml,
scrape interval lowered to 1s) is translated into the scrape configuration the Prometheus Operator
generates from it (scheme, path, TLS CA and server name, bearer credentials). /usr/bin/prometheus
then scrapes a real sidecar that a real Monitor fed: the target is up and the exported
‖ΔW‖_F equals the float64 reference. The same target without the token is down (401).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support import PrometheusServer
from test_deploy_chart import MTLS_VALUES, by_kind, render
from test_security_grpc_http import TOKEN, Pki, make_pki
from test_security_serve import monitor, serve, token_and_tls_flags, train_one_check

SERVICE_DNS = "deltawatch.ml.svc"  # what the chart's ServiceMonitor checks the certificate for


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), dns_names=(SERVICE_DNS,))


def scrape_config(endpoint: dict, job: str, target: str, ca: Path, token_file: Path | None):
    """The Prometheus scrape configuration for one ServiceMonitor endpoint (what the Prometheus
    Operator writes: the Secret references become files)."""
    config = {
        "job_name": job,
        "scheme": endpoint.get("scheme", "http"),
        "metrics_path": endpoint["path"],
        "scrape_interval": endpoint["interval"],
        "scrape_timeout": endpoint["scrapeTimeout"],
        "honor_labels": endpoint["honorLabels"],
        "static_configs": [{"targets": [target]}],
    }
    if "tlsConfig" in endpoint:
        config["tls_config"] = {
            "ca_file": str(ca),
            "server_name": endpoint["tlsConfig"]["serverName"],
        }
    if token_file is not None and "authorization" in endpoint:
        config["authorization"] = {
            "type": endpoint["authorization"]["type"],
            "credentials_file": str(token_file),
        }
    return config


def test_prometheus_scrapes_the_sidecar_as_the_service_monitor_says(
    tmp_path: Path, pki: Pki
) -> None:
    values = {
        **MTLS_VALUES,
        "serviceMonitor": {
            **MTLS_VALUES["serviceMonitor"],
            "interval": "1s",
            "scrapeTimeout": "1s",
        },
    }
    (service_monitor,) = by_kind(
        render(values, name="deltawatch", namespace="ml"), "ServiceMonitor"
    )
    (endpoint,) = service_monitor["spec"]["endpoints"]
    assert endpoint["scheme"] == "https" and endpoint["tlsConfig"]["serverName"] == SERVICE_DNS
    flags = (*token_and_tls_flags(tmp_path, pki), "--metrics-require-token")
    token_file = tmp_path / "token"
    with serve(tmp_path / "sidecar", *flags) as ports:
        model, mon = monitor(ports["grpc_port"], "scraped", tls={"ca": str(pki.ca)}, token=TOKEN)
        reference = train_one_check(model, mon)
        assert mon.close(timeout=60) is True, mon.stats()

        target = f"127.0.0.1:{ports['http_port']}"
        configs = [
            scrape_config(endpoint, "deltawatch", target, pki.ca, token_file),
            scrape_config(endpoint, "no-token", target, pki.ca, None),
        ]
        with PrometheusServer(tmp_path, scrape_configs=configs) as prometheus:
            prometheus.wait_for_scrapes(2)  # start-up and two scrapes, not a speed assertion
            scrapes = {
                r["metric"]["job"]: int(r["value"][1])
                for r in prometheus.query("count_over_time(up[5m])")
            }
            assert scrapes.get("deltawatch", 0) >= 2 and scrapes.get("no-token", 0) >= 2, scrapes
            up = {r["metric"]["job"]: r["value"][1] for r in prometheus.query("up")}
            assert up == {"deltawatch": "1", "no-token": "0"}
            targets = prometheus.get("/targets")["data"]["activeTargets"]
            errors = {t["labels"]["job"]: t["lastError"] for t in targets}
            assert errors["deltawatch"] == "" and "401" in errors["no-token"], errors
            series = prometheus.query('deltawatch_update_frobenius_norm{run="scraped"}')
            got = {s["metric"]["matrix"]: float(s["value"][1]) for s in series}
            assert got.keys() == reference.keys()
            for name, value in reference.items():
                assert got[name] == pytest.approx(value, rel=1e-6), name
            assert all(s["metric"]["job"] == "deltawatch" for s in series)
