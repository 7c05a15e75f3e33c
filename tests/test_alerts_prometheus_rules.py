"""The Prometheus rules file: valid for promtool, its unit tests pass, and it agrees with the
engine's defaults and the exported metric names."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from deltawatch.sidecar import keys
from deltawatch.sidecar.alerts.config import AlertConfig
from deltawatch.sidecar.alerts.rules import RULES

ROOT = Path(__file__).resolve().parents[1]
RULES_FILE = ROOT / "prometheus" / "deltawatch-rules.yml"
TESTS_FILE = ROOT / "prometheus" / "deltawatch-rules.test.yml"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=RULES_FILE.parent
    )


def _rules() -> dict[str, dict]:
    doc = yaml.safe_load(RULES_FILE.read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}


def test_promtool_check_rules_accepts_the_file():
    out = _promtool("check", "rules", str(RULES_FILE))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_unit_tests_pass():
    out = _promtool("test", "rules", TESTS_FILE.name)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_unit_tests_catch_a_wrong_threshold(tmp_path):
    """The unit tests are not vacuous: the drift rule with a threshold of 0.4 fails them."""
    broken = RULES_FILE.read_text().replace(
        "deltawatch_subspace_alignment_ratio < 0.7", "deltawatch_subspace_alignment_ratio < 0.4"
    )
    (tmp_path / RULES_FILE.name).write_text(broken)
    shutil.copy(TESTS_FILE, tmp_path / TESTS_FILE.name)
    out = subprocess.run(
        [PROMTOOL, "test", "rules", TESTS_FILE.name],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode != 0
    assert "DeltawatchSubspaceDrift" in out.stdout + out.stderr


def test_every_engine_rule_has_a_prometheus_twin():
    by_rule = {r["labels"].get("rule"): name for name, r in _rules().items()}
    for rule in RULES:
        assert rule in by_rule, f"no Prometheus rule carries rule={rule}"


@pytest.mark.parametrize(
    ("alert", "metric_key", "numbers"),
    [
        ("DeltawatchSubspaceDrift", "subspace_alignment", ["subspace_drift.threshold"]),
        ("DeltawatchChannelLeak", "channel_energy_ratio", ["channel_leak.threshold"]),
        ("DeltawatchStableRankExcursion", "stable_rank", ["stable_rank_excursion.factor"]),
        (
            "DeltawatchVisibilitySpike",
            "bf16_visible_ratio",
            ["visibility_spike.factor", "visibility_spike.min_increase"],
        ),
    ],
)
def test_thresholds_match_the_engine_defaults(alert, metric_key, numbers):
    expr = _rules()[alert]["expr"]
    assert keys.BINDING_BY_KEY[metric_key].metric in expr
    config = AlertConfig()
    literals = {float(x) for x in re.findall(r"(?<![\w.])(\d+(?:\.\d+)?)(?![\w.])", expr)}
    for dotted in numbers:
        section, name = dotted.split(".")
        value = getattr(getattr(config, section), name)
        assert float(value) in literals, f"{alert}: {dotted} = {value} not in {expr!r}"


def test_every_metric_in_the_rules_is_exported():
    exported = exported_metrics()
    for name, rule in _rules().items():
        for metric in re.findall(r"\bdeltawatch_[a-z0-9_]+", rule["expr"]):
            assert metric in exported, f"{name} uses {metric}, which the sidecar does not export"


def exported_metrics() -> set[str]:
    """Every series name the sidecar exports, as grafana/generate.py derives it from the code."""
    spec = importlib.util.spec_from_file_location(
        "deltawatch_grafana_generate", ROOT / "grafana" / "generate.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.exported_metrics()
