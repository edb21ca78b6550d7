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
    r = subprocess.run(run + ["--engine", "native,vllm", "--vllm_env", "LD_PRELOAD"],
                       capture_output=True, text=True, timeout=120)
    one_line_error(r, "--vllm_env LD_PRELOAD", "NAME=VALUE")
    r = subprocess.run(run + ["--engine", "native,vllm", "--per_client", "0"],
                       capture_output=True, text=True, timeout=120)
    one_line_error(r, "--per_client")
    missing = str(tmp_path / "no-venv" / "bin" / "python")
    r = subprocess.run(run + ["--engine", "native,vllm", "--vllm_python", missing],
                       capture_output=True, text=True, timeout=120)
    one_line_error(r, missing, "make setup-vllm")


def test_bench_serve_table_takes_medians_and_judges_the_targets():
    """Side by side: per clients and configuration the median of the rounds, ratios of medians
    against plain vLLM and the native engine, and the issue's targets on them."""
    import importlib.util
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location(
        "bench_serve", os.path.join(ROOT, "bench", "bench_serve.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    speeds = {"plain": [100, 300, 200], "idle": [190, 90, 500], "steered": [150, 10, 170],
              "offline": [250, 180, 260], "native": [90, 80, 85]}
    results = {f"{n}@16": [{"tokens_per_s": x, "p50_s": 1.0} for x in v]
               for n, v in speeds.items()}
    a = SimpleNamespace(clients=[16], rounds=3, probed=True)
    rows = {r["config"]: r for r in bench.table(a, list(speeds), results)}
    assert rows["idle"]["tokens_per_s"] == 190 and rows["idle"]["min"] == 90
    assert abs(rows["idle"]["vs_plain"] - 0.95) < 1e-12
    assert abs(rows["steered"]["vs_plain"] - 0.75) < 1e-12
    assert abs(rows["plain"]["vs_native"] - 200 / 85) < 1e-12
    judged = {what: ok for what, _, _, ok in bench.verdicts(list(rows.values()))}
    assert judged == {"idle / plain at 16 clients": True, "idle / native at 16 clients": True,
                      "steered / plain at 16 clients": False,
                      "steered / native at 16 clients": False}
    # the engine alone is the ceiling, reported beside the targets, not judged as one
    [(clients, ceiling)] = bench.ceilings(list(rows.values()))
    assert clients == 16 and abs(ceiling - 250 / 85) < 1e-12
