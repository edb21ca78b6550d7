import os
import subprocess
import sys

from conftest import ROOT, one_line_error


def test_run_all_refuses_bad_threads_and_writes_nothing():
    results = os.path.join(ROOT, "bench", "RESULTS.md")
    before = os.stat(results).st_mtime_ns
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run_all.py"),
                        "--threads", "0"],
                       capture_output=True, text=True, timeout=120)
    one_line_error(r, "--threads 0")
    assert r.returncode == 2 and "running:" not in r.stdout
    assert os.stat(results).st_mtime_ns == before


def test_before_after_refuses_unknown_work_and_commit():
    run = [sys.executable, "-m", "bench.before_after"]
    r = subprocess.run(run + ["--base", "HEAD", "--only", "decod"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    one_line_error(r, "--only 'decod'", "probes, decode")
    r = subprocess.run(run + ["--base", "no-such-commit-xyz", "--only", "decode"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    one_line_error(r, "--base no-such-commit-xyz")
