"""One meaning per flag name across every command (issue 20): --dtype is a dtype written to disk
(a cache, converted weights), --compute_dtype the model's arithmetic (--dtype and --model_dtype
kept as its aliases where no on-disk dtype is a flag), --device defaults to auto; a missing
input file is named with the flag that gave it."""
import os
import re
import runpy
import subprocess

import pytest

from conftest import ROOT, in_process, one_line_error
from test_cli import COMMANDS, invoke


def help_rows(name):
    r = invoke(name, "-h")
    assert r.returncode == 0, r.stderr
    return {m.group(1): line for line in r.stdout.splitlines()
            if (m := re.match(r"\s+--(\w+)", line))}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_dtype_and_device_mean_one_thing(name):
    rows = help_rows(name)
    if "dtype" in rows:
        assert "disk" in rows["dtype"], rows["dtype"]
    if "compute_dtype" in rows:
        assert "arithmetic" in rows["compute_dtype"], rows["compute_dtype"]
    if "device" in rows:
        assert re.search(r"default:? auto\b", rows["device"]), rows["device"]


def test_old_dtype_spelling_still_sets_the_compute_dtype():
    for name in ("scripts/generate.py", "scripts/steer.py", "python -m llama.checkpoint"):
        rows = help_rows(name)
        assert "dtype" not in rows and "--dtype" in rows["compute_dtype"], name
    # extraction keeps --dtype for the cache and --compute_dtype for the model
    rows = help_rows("scripts/cache_activations.py")
    assert "disk" in rows["dtype"] and "--dtype" not in rows["compute_dtype"]


@pytest.mark.parametrize("name, argv, flag", [
    ("generate_dataset.py", ["OUT/p.csv", "--input", "MISSING"], "--input"),
    ("generate_dataset.py build_validation",
     ["OUT/v.json", "--testing", "MISSING", "--deployment", "MISSING"], "--testing"),
    ("scripts/generate.py", ["--model", "m", "--prompts", "MISSING"], "--prompts"),
    ("scripts/steer.py", ["--model", "m", "--data", "MISSING", "--vectors", "v", "--layers", "1",
                          "--output", "OUT/s"], "--data"),
    ("example.py", ["--ckpt_dir", "m", "--prompt_csv", "MISSING",
                    "--save_activations_path", "OUT/c"], "--prompt_csv"),
])
def test_a_missing_file_names_its_flag(name, argv, flag, tmp_path):
    """Every command's missing-input error says which flag named the file, as typed."""
    missing = str(tmp_path / "missing.json")
    argv = [missing if a == "MISSING" else a.replace("OUT", str(tmp_path / "out")) for a in argv]
    r = invoke(name, *argv)
    one_line_error(r, f"{flag} {missing}: no such file")
    assert not (tmp_path / "out").exists()


def test_subcommand_list_shows_whole_sentences():
    """`ccs.py -h` lists each subcommand with a description that is not cut mid-sentence."""
    r = in_process(["ccs.py", "-h"],
                   lambda: runpy.run_path(os.path.join(ROOT, "ccs.py"), run_name="__main__"))
    rows = [line.split(None, 1) for line in r.stdout.splitlines() if line.startswith("  ")]
    assert {name for name, _ in rows} == {"train", "transfer"}
    assert all(about.rstrip().endswith(".") for _, about in rows), rows


def test_seed_outputs_are_ignored(tmp_path):
    """What seed 0's commands write at the repository root shows as ignored, not untracked."""
    paths = ["validation_experiment1/probe_stats_layer10.csv", "validation_trad/summary.csv",
             "probe_results/x.csv", "ea_20260101_120000/normalized_vectors/layer_10.npy"]
    r = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT,
                       capture_output=True, text=True)
    assert sorted(r.stdout.split()) == sorted(paths), r.stdout + r.stderr
