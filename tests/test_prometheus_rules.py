"""Prometheus rules and config under deploy/prometheus, checked by the real promtool: syntax, and unit
tests that each alert fires when it should and not before."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

PROM = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (.ci/run installs Debian's "
                                                         "prometheus package)")


def promtool(*args: str) -> str:
    done = subprocess.run([PROMTOOL, *args], cwd=PROM, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_rules_are_valid():
    count = sum(len(group["rules"]) for group in yaml.safe_load((PROM / "rules.yml").read_text())["groups"])
    assert count > 0 and f"SUCCESS: {count} rules found" in promtool("check", "rules", "rules.yml")


def test_alert_unit_tests_pass():
    assert "SUCCESS" in promtool("test", "rules", "rules_test.yml")


def test_local_config_is_valid_and_loads_the_rules():
    out = promtool("check", "config", "scrape-local.yml")
    assert "rules.yml" in out and "SUCCESS" in out


def test_a_broken_alert_test_fails(tmp_path):
    """The unit tests can fail: the same test with the wrong expected group must not pass."""
    broken = (PROM / "rules_test.yml").read_text().replace('group: "0"}', 'group: "1"}')
    (tmp_path / "rules.yml").write_text((PROM / "rules.yml").read_text())
    (tmp_path / "rules_test.yml").write_text(broken)
    done = subprocess.run([PROMTOOL, "test", "rules", "rules_test.yml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "FAILED" in done.stdout + done.stderr
