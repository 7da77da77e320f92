"""`mmtrain doctor` on CPU: 2 local ranks (gloo) it starts itself, the same under torchrun (a
launcher's world is used, not a new one), and an unwritable shared directory failing the run."""

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO

pytestmark = pytest.mark.dist


def _doctor(args, launcher_nproc=None):
    cmd = [sys.executable, "-m", "mmtrain.cli", "doctor", *args]
    if launcher_nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={launcher_nproc}",
               "-m", "mmtrain.cli", "doctor", *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**env, "OMP_NUM_THREADS": "1"})


def _by_name(stdout):
    report = json.loads(stdout)
    return report, {c["name"]: c for c in report["checks"]}


def test_two_local_ranks_pass(tmp_path):
    shared = tmp_path / "shared"
    done = _doctor(["--nproc", "2", "--shared-dir", str(shared), "--json"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report, checks = _by_name(done.stdout)
    assert report["ok"]
    for name in ("python", "torch", "deepspeed", "transformers", "webdataset", "open_clip"):
        assert checks[name]["status"] == "PASS", checks[name]
    assert checks["flash-attn"]["status"] in ("PASS", "WARN")  # optional
    assert checks["world"]["detail"].startswith("2 ranks on 1 host")
    assert checks["all-reduce"]["status"] == "PASS" and "sum correct on every rank" in checks["all-reduce"]["detail"]
    assert checks["shared filesystem"]["status"] == "PASS"
    assert checks["versions across ranks"]["status"] == "PASS"
    assert checks["disk space"]["status"] in ("PASS", "WARN")
    assert os.listdir(shared) == []  # every rank removed its probe file after all had read them


def test_under_a_launcher_uses_its_world_and_rank_0_reports(tmp_path):
    done = _doctor(["--shared-dir", str(tmp_path)], launcher_nproc=2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # One report, from rank 0 of the launcher's world: a rank that started a world of its own
    # would print its own report too.
    assert done.stdout.count("PASS  world: 2 ranks on 1 host") == 1, done.stdout
    assert "PASS  shared filesystem" in done.stdout and "0 failed" in done.stdout


def test_unwritable_shared_dir_fails_with_nonzero_exit(tmp_path):
    # A regular file where a directory should be: not writable even for root.
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    done = _doctor(["--nproc", "2", "--shared-dir", str(blocker / "runs"), "--json"])
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    report, checks = _by_name(done.stdout)
    assert not report["ok"]
    shared = checks["shared filesystem"]
    assert shared["status"] == "FAIL"
    assert "rank 0" in shared["detail"] and "rank 1" in shared["detail"] and str(blocker) in shared["detail"]
    assert checks["all-reduce"]["status"] == "PASS"  # the other checks still ran


def test_a_library_outside_setup_py_requirements_fails(monkeypatch):
    from mmtrain.engine import doctor

    real = doctor.setup_requirements()
    monkeypatch.setattr(doctor, "setup_requirements",
                        lambda: ({**real[0], "torch": ">=99", "webdataset": "<0.1"}, real[1]))
    checks = {c.name: c for c in doctor.library_checks()}
    assert checks["torch"].status == "FAIL" and "torch>=99" in checks["torch"].detail
    assert checks["webdataset"].status == "FAIL" and checks["deepspeed"].status == "PASS"
