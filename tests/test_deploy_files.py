"""The systemd units in deploy/systemd/ are valid for systemd itself (`systemd-analyze verify`) and say what the
README and docs/OPERATIONS.md promise: the worker drains on SIGTERM (KillMode=mixed), comes back after a crash
(Restart=on-failure), both read their settings from one EnvironmentFile."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require

BASE_DIR = Path(__file__).resolve().parent.parent
UNITS = BASE_DIR / "deploy" / "systemd"


def _verify(folder: Path, *names: str) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("systemd-analyze"), "verify", "--man=no", *[str(folder / n) for n in names]],
                          capture_output=True, text=True, timeout=120)


def _installed_copy(tmp_path: Path, name: str, text: str | None = None) -> Path:
    """The unit as it would be installed, its /opt/kasa pointing at this checkout (whose .venv holds daphne and
    python: verify checks that each ExecStart program exists) and its EnvironmentFile at a file in tmp_path."""
    env = tmp_path / "kasa.env"
    env.write_text((UNITS / "kasa.env.example").read_text())
    text = text if text is not None else (UNITS / name).read_text()
    (tmp_path / name).write_text(text.replace("/opt/kasa", str(BASE_DIR)).replace("/etc/kasa/kasa.env", str(env)))
    return tmp_path


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # keys as written
    parser.read(UNITS / name)
    return parser


@pytest.fixture
def analyze():
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze (Debian package systemd)")
    require((BASE_DIR / ".venv" / "bin" / "daphne").exists(), "the virtualenv (make install)")


def test_the_web_and_worker_units_pass_systemd_analyze_verify(analyze, tmp_path):
    for name in ("kasa-web.service", "kasa-worker.service"):
        _installed_copy(tmp_path, name)
    done = _verify(tmp_path, "kasa-web.service", "kasa-worker.service")
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), done.stderr + done.stdout


def test_systemd_analyze_verify_would_catch_a_broken_unit(analyze, tmp_path):
    broken = (UNITS / "kasa-worker.service").read_text().replace("KillMode=mixed", "KillMode=sometimes")
    _installed_copy(tmp_path, "kasa-worker.service", broken)
    done = _verify(tmp_path, "kasa-worker.service")
    assert "kill mode" in done.stderr.lower(), done.stderr  # a warning only (exit 0): hence no output at all above


def test_the_worker_drains_restarts_on_failure_and_keeps_only_the_capabilities_it_needs():
    worker = _unit("kasa-worker.service")["Service"]
    assert worker["ExecStart"].endswith("manage.py qcluster")
    assert worker["KillMode"] == "mixed" and worker["Restart"] == "on-failure"
    assert worker["User"] == "root" and worker["NoNewPrivileges"] == "true"
    assert set(worker["CapabilityBoundingSet"].split()) == {
        "CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_KILL"}
    web = _unit("kasa-web.service")["Service"]
    assert "daphne" in web["ExecStart"] and web["User"] == "kasa" and web["CapabilityBoundingSet"] == ""
    assert web["EnvironmentFile"] == worker["EnvironmentFile"] == "/etc/kasa/kasa.env"


def test_the_runbook_is_linked_from_the_readme_and_covers_the_operators_cases():
    readme = (BASE_DIR / "README.md").read_text()
    assert "docs/OPERATIONS.md" in readme and "deploy/systemd/" in readme
    runbook = (BASE_DIR / "docs" / "OPERATIONS.md").read_text().lower()
    for topic in ("daily checks", "a backup failed", "quarantined", "restoring kasa itself", "rotating keys",
                  "rotate_secrets", "kasa_backup_keys"):
        assert topic in runbook, topic
