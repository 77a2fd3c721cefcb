"""chatd.service: systemd accepts it, and it asks for what chatd implements."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ROOT

UNIT = ROOT / "chatd.service"


def _unit(tmp_path: Path, extra: str = "") -> Path:
    """The unit as installed: ExecStart= pointing at this environment's chatd."""
    chatd = Path(sys.executable).parent / "chatd"
    text = UNIT.read_text().replace("ExecStart=/usr/bin/chatd", f"ExecStart={chatd}")
    text = text.replace("[Service]\n", f"[Service]\n{extra}")
    path = tmp_path / "chatd.service"
    path.write_text(text)
    return path


def _verify(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60
    )


def test_unit_declares_notify_sandbox_and_limits():
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string(UNIT.read_text())
    service = parser["Service"]
    assert service["Type"] == "notify"
    assert service["ExecStart"] == "/usr/bin/chatd"
    assert service["Restart"] == "on-failure"
    assert service["DynamicUser"] == "yes"
    assert service["StateDirectory"] == "chatd"
    assert service["Environment"] == "CHATD_DATA_DIR=%S/chatd"
    assert service["EnvironmentFile"].endswith("/etc/chatd/chatd.env")
    assert service["KillMode"] == "mixed"  # chatd stops its embedded servers itself
    assert int(service["LimitNOFILE"]) >= 65536
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
                "ProtectControlGroups"):  # fmt: skip
        assert service[key] == "yes", key
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == "%S/chatd"
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert service["WatchdogSec"]  # chatd pings WATCHDOG=1 (tests/test_shutdown.py)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    result = _verify(_unit(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "chatd.service" not in result.stderr, result.stderr  # no warnings about it


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verify_would_catch_a_broken_unit(tmp_path):
    result = _verify(_unit(tmp_path, extra="Type=notifyy\n"))
    assert "notifyy" in result.stderr
