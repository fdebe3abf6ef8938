"""test_pretrain_setup.py, the by-hand setup check: passes on the real configs, fails loudly on a bad one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow  # subprocesses end to end: make test runs it, make test-fast skips it


def run_setup(*overrides: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CAD_DEBUG", None)
    return subprocess.run(
        [sys.executable, str(REPO / "test_pretrain_setup.py"), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_setup_check_passes(tmp_path):
    r = run_setup(cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == "All tests passed! ✓"
    checks = [ln for ln in lines if ln.startswith("[")]
    assert len(checks) == 7 and all(ln.startswith("[PASS] ") for ln in checks), r.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written where it was launched


def test_setup_check_fails_with_a_bad_override(tmp_path):
    r = run_setup("model.n_latent=0", cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    fails = [ln for ln in lines if ln.startswith("[FAIL] ")]
    assert fails and any("n_latent=0 must be an integer in [1, 1024]" in ln for ln in fails), r.stdout
    assert lines[-1].endswith("checks failed.") and "All tests passed" not in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
