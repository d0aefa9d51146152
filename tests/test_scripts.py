"""The set-up scripts change nothing outside the checkout: `scripts/setup.sh` (run by `scripts/demo.sh`) never
calls a system package manager."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_setup_calls_no_package_manager(tmp_path):
    log = tmp_path / "calls.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("apt-get", "apt", "dpkg", "sudo", "chromium", "snap", "brew"):
        fake = bin_dir / tool
        fake.write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {log}\n")
        fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{REPO / '.venv' / 'bin'}:/usr/bin:/bin"}
    out = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh")], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert not log.exists(), log.read_text()
    demo = (REPO / "scripts" / "demo.sh").read_text()
    assert "apt" not in demo and "setup.sh" in demo  # the demo's only set-up is setup.sh
