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


def test_bench_serve_refuses_bad_engines_and_a_missing_vllm_venv(tmp_path):
    run = [sys.executable, os.path.join(ROOT, "bench", "bench_serve.py")]
    r = subprocess.run(run + ["--engine", "native,tgi"], capture_output=True, text=True,
                       timeout=120)
    one_line_error(r, "--engine native,tgi")
    r = subprocess.run(run + ["--engine", "native,vllm", "--clients", "16,x"],
                       capture_output=True, text=True, timeout=120)
    one_line_error(r, "--clients 16,x")
    missing = str(tmp_path / "no-venv" / "bin" / "python")
    r = subprocess.run(run + ["--engine", "native,vllm", "--vllm_python", missing],
                       capture_output=True, text=True, timeout=120)
    one_line_error(r, missing, "make setup-vllm")
