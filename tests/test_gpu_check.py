"""bench/gpu_check.py, the command to run on a first GPU, run here with --device cpu (tiny shapes,
gloo, float32) so that it cannot rot: the report holds every section with its figures, and the
CPU-against-CPU comparisons agree. Also its refusals, its table of GPU peaks and its verdicts."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, one_line_error, table_rows

SCRIPT = os.path.join(ROOT, "bench", "gpu_check.py")
# one torch thread: on a shared machine a second one mostly spins waiting for its turn
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}


def bench_module(name):
    """A module of bench/ (not a package: its scripts import each other by name)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "report"
    r = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--out", str(out)],
                       capture_output=True, text=True, env=ENV, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(out / "gpu_check.json") as f:
        res = json.load(f)
    return out, res, (out / "gpu_check.md").read_text()


def sections(md: str) -> dict:
    """{heading: body} of the report's ## sections."""
    parts = re.split(r"^## (.+)$", md, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def test_report_holds_every_section_with_numbers(checked):
    out, res, md = checked
    sec = sections(md)
    want = ["Summary", "Device", "(a) Extraction", "(b) Greedy generation", "(c) Process groups",
            "(d) Llama-3.1-8B-shaped speed"]
    for head in want:
        found = [k for k in sec if k.startswith(head)]
        assert found, f"no section {head!r} in {list(sec)}"
        assert re.search(r"\d", sec[found[0]]), f"section {head!r} has no number"
    assert "errors.txt" not in md  # no part failed
    assert not (out / "errors.txt").exists()
    # one row per layer of each model (SmolLM2: 31; the tiny GQA model: 5), each a number
    a = sec[next(k for k in sec if k.startswith("(a)"))]
    rows = re.findall(r"^\| (\d+) \| ([0-9.e+-]+) \|", a, flags=re.M)
    assert len(rows) == 31 and [int(r[0]) for r in rows] == list(range(31))
    d = sec[next(k for k in sec if k.startswith("(d)"))]
    assert re.search(r"\| ours \| [0-9.]+ \| [0-9.]+ [kMGT]?FLOP/s \|", d)
    assert re.search(r"\| transformers \| 4 \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ [kMGT]?B/s \|", d)
    assert "| (d) 8B-shaped speed (ours and transformers agree) | pass |" in md


def test_cpu_against_cpu_agrees(checked):
    _, res, _ = checked
    assert res["dtype"] == "float32" and res["device"] == "cpu"
    assert set(res["models"]) == {"SmolLM2-135M", "tiny GQA"}
    for name, m in res["models"].items():
        assert len(m["rel_error"]) == m["layers"] + 1, name
        # the same float32 kernels on the same machine: identical up to thread scheduling
        assert m["worst_rel_error"] <= 1e-6, (name, m["rel_error"])
        assert m["logprob_max_abs"] <= 1e-5, name
        assert [g["verdict"] for g in m["generation"]] == ["equal"] * 4, name
        assert all(g["tokens"] == 32 for g in m["generation"])
    g = res["groups"]
    assert g["mp1_backend"] == "gloo" and g["torchrun_backend"] == "gloo"
    assert g["torchrun_world"] == 2 and g["ok"]
    # model parallel 2 sums two partial products: float32 rounding of a different order only
    assert g["worst_rel_error"] <= 1e-5
    assert [x["verdict"] for x in g["generation"]] == ["equal"] * 4
    s = res["speed"]
    # the same float32 weights in two libraries: the summation order differs, nothing else
    assert s["extract"]["rel_error_vs_hf"] <= 1e-5
    assert all(r["rows_agree"] == r["batch"] for r in s["decode"])
    assert all(v == "pass" for _, v in res["verdicts"])


@pytest.mark.parametrize("argv, words", [
    (["--device", "tpu"], ["--device", "tpu"]),
    (["--dtype", "int8"], ["--dtype", "int8"]),
    (["--peak_tflops", "-3"], ["--peak_tflops"]),
    (["--devcie", "cpu"], ["--devcie"]),
    (["--vllm", "yes", "--vllm_python", "/no/venv/bin/python"],
     ["--vllm yes", "/no/venv/bin/python", "make setup-vllm"]),
    (["--vllm", "maybe"], ["--vllm", "maybe"]),
])
def test_bad_flags_are_one_line(argv, words, tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", *argv, "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, env=ENV,
                       timeout=120)
    one_line_error(r, *words)
    assert r.returncode == 2 and not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_cuda_without_a_gpu_is_refused(tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=ENV, timeout=120)
    one_line_error(r, "--device cuda", "no CUDA device")
    assert not (tmp_path / "o").exists()


def test_without_transformers_it_names_the_set_up(tmp_path):
    """On a machine set up by `make demo` only (no transformers): one line naming the set-up
    it needs, before any work."""
    hide = ("import runpy, sys; sys.modules['transformers'] = None; "
            f"sys.argv = [{SCRIPT!r}, '--device', 'cpu', '--out', {str(tmp_path / 'o')!r}]; "
            f"runpy.run_path({SCRIPT!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, env=ENV,
                       cwd=os.path.join(ROOT, "bench"), timeout=120)
    one_line_error(r, "transformers", "pip install -r requirements-dev.txt")
    assert not (tmp_path / "o").exists()


def test_peak_table():
    """Device names as torch.cuda.get_device_name spells them; the most specific entry wins
    (approx: TB/s x 1e12 is not exact in binary floating point)."""
    parts = bench_module("gpu_parts")
    assert parts.peak_for("NVIDIA H200") == ("H200", 989e12, pytest.approx(4.8e12))
    assert parts.peak_for("NVIDIA H100 80GB HBM3")[1:] == pytest.approx((989e12, 3.35e12))
    assert parts.peak_for("NVIDIA H100 PCIe")[0] == "H100 PCIe"
    assert parts.peak_for("NVIDIA A100-SXM4-80GB")[1:] == pytest.approx((312e12, 2.039e12))
    assert parts.peak_for("NVIDIA A100-SXM4-40GB")[1:] == pytest.approx((312e12, 1.555e12))
    assert parts.peak_for("NVIDIA H200 NVL")[1] == 835e12
    assert parts.peak_for("NVIDIA GeForce GTX 1080") is None


def test_verdicts_report_a_failure_and_an_error(tmp_path):
    report = bench_module("gpu_report")
    model = {"model": "m", "layers": 1, "dim": 8, "heads": "2/1", "pairs": 8,
             "rel_error": {0: 0.0, 1: 0.2}, "worst_rel_error": 0.2, "tolerance": 0.05,
             "extraction_ok": False, "logprob_max_abs": 0.1, "generation_ok": True,
             "generation": [{"equal": False, "tokens": 32, "first_diff": 3, "ref_margin": 0.01,
                             "dev_margin": 0.02, "logit_max_abs": 0.05,
                             "logit_rel_error": 0.01, "verdict": "near tie"}]}
    res = {"command": "c", "date": "d", "seconds": 1, "cpu_seconds": 1, "dtype": "bfloat16",
           "device": "cuda", "info": {"error": "RuntimeError: boom"},
           "models": {"m": model, "SmolLM2-135M": {"error": "not run: not installed"}},
           "groups": {"error": "RuntimeError: torchrun MP 2 exited 1"},
           "speed": {"error": "OutOfMemoryError: CUDA out of memory"}}
    res["verdicts"] = report.verdicts(res)
    assert dict(res["verdicts"]) == {
        "(a) extraction, m": "FAIL", "(b) greedy generation, m": "pass",
        "(a) extraction, SmolLM2-135M": "not run", "(b) greedy generation, SmolLM2-135M":
        "not run", "(c) process groups": "error", "(d) 8B-shaped speed": "error"}
    md = open(report.write_report(res, str(tmp_path))).read()
    assert "**FAIL**" in md
    (tie,) = [c for c in table_rows(md) if "near tie at token 3" in c]
    margin = tie[tie.index("near tie at token 3") + 1]
    assert float(margin) == pytest.approx(0.01, abs=5e-4)
    assert "**OutOfMemoryError: CUDA out of memory** (traceback in errors.txt)" in md
    assert "SmolLM2-135M: **not run: not installed**" in md


def test_vllm_part_is_skipped_on_the_cpu_in_one_line(checked):
    _, res, md = checked
    assert res["vllm"] == {"skipped": "vLLM part skipped on --device cpu (tests/on_vllm check "
                                      "vLLM on the CPU; --vllm yes runs it here)"}
    assert res["vllm"]["skipped"] in sections(md)["(e) vLLM, steered, against the native engine"]
    assert not [name for name, _ in res["verdicts"] if name.startswith("(e)")]


def test_vllm_part_verdicts():
    """The native engine's greedy ids against vLLM's: equal, a near tie or a mismatch; a run
    passes when steering changed the texts, they match the native ones and every rank pushed."""
    parts = bench_module("gpu_parts")
    report = bench_module("gpu_report")
    steps = [torch.tensor([0.0, 5.0, 4.9995]), torch.tensor([3.0, 0.0, 1.0])]
    assert parts.first_difference([1, 0], steps, [1, 0], 1e-3)["verdict"] == "equal"
    tie = parts.first_difference([1, 0], steps, [2, 0], 1e-3)
    assert tie["verdict"] == "near tie" and tie["first_diff"] == 0
    assert tie["ref_margin"] == pytest.approx(5e-4, abs=1e-6)
    wrong = parts.first_difference([1, 0], steps, [1, 2], 1e-3)
    assert wrong["verdict"] == "MISMATCH" and wrong["ref_margin"] == pytest.approx(2.0)
    assert parts.first_difference([1, 0], steps, [1], 1e-3)["verdict"] == "length differs"
    push = {"10": 0.4, "20": 0.3}
    good = {"tp": 2, "vllm": "0.32.0", "start_s": 80.0, "plain": [[1], [2], [3], [4]],
            "steered": [[5], [6], [7], [4]], "push": [[push, push]] * 4,
            "against_native": [{"verdict": "equal", "tokens": 1}] * 3 + [tie],
            "plain_tokens_per_s": 900.0, "steered_tokens_per_s": 850.0}
    assert parts.vllm_ok(good, ["10", "20"])
    assert not parts.vllm_ok({**good, "steered": good["plain"]}, ["10", "20"])  # a no-op
    assert not parts.vllm_ok({**good, "push": [[push, None]] * 4}, ["10", "20"])
    assert not parts.vllm_ok({**good, "against_native": [wrong] * 4}, ["10", "20"])
    res = {"models": {}, "groups": {"error": "x"}, "speed": {"error": "x"},
           "vllm": {"tie": 1e-3, "runs": {"1": {**good, "ok": True},
                                          "2": {**good, "ok": False}}}}
    assert report.verdicts(res)[-2:] == [
        ("(e) vLLM at TP 1, steered, against the native engine", "pass"),
        ("(e) vLLM at TP 2, steered, against the native engine", "FAIL")]
    rows = table_rows("\n".join(report.vllm_section(res["vllm"])))
    assert rows[0][:4] == ["1", "0.32.0", "80", "3 of 4"]
    assert "near tie at token 0" in rows[0][4] and float(rows[0][7]) == 850
