"""The seeds' set-up as written: `pip install -r requirements.txt` installs the pins
(requirements/pins.txt, the one file pyproject.toml reads too) and the project itself (`-e .`),
then the seeds' commands run as written: LLaMA-CCS's `torchrun ... example.py` and the cached
workflow's `python scripts/cache_activations.py`. A door that cannot import its package says in
one line what to run."""
import glob
import os
import re
import subprocess
import sys
import tomllib

import pytest

from conftest import ROOT, one_line_error
from tiny import make_hf

DOORS = ["ccs.py", "example.py", "generate_dataset.py"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "scripts", "*.py")))


def test_one_file_of_pins():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        dynamic = tomllib.load(f)["tool"]["setuptools"]["dynamic"]["dependencies"]["file"]
    assert dynamic == ["requirements/pins.txt"]
    lines = [x.strip() for x in open(os.path.join(ROOT, "requirements.txt"))]
    assert "-r requirements/pins.txt" in lines and "-e ." in lines
    pins = [x.strip() for x in open(os.path.join(ROOT, "requirements", "pins.txt"))
            if x.strip() and not x.startswith("#")]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][\w.]*", p) for p in pins), pins
    assert any(p.startswith("torch==") for p in pins)


def test_a_door_without_its_package_says_what_to_run(tmp_path):
    """Every door run by an interpreter that sees no installed package (-I -S: no site-packages,
    no PYTHONPATH) fails in one line that names the set-up command."""
    assert len(DOORS) >= 14
    for door in DOORS:
        r = subprocess.run([sys.executable, "-I", "-S", os.path.join(ROOT, door), "-h"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=60)
        one_line_error(r, "No module named", "pip install -r requirements.txt")


@pytest.mark.heavy
def test_seed_setup_then_the_seed_commands(tmp_path):
    """A fresh virtual environment (the shared torch seen through --system-site-packages),
    `pip install -r requirements.txt` in the clone, then both seeds' commands verbatim, with no
    PYTHONPATH: each writes its cache."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=300)
    py = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"

    def run(*args, cwd=ROOT):
        r = subprocess.run([*map(str, args)], capture_output=True, text=True, cwd=cwd, env=env,
                           timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        return r

    run(py, "-m", "pip", "install", "-q", "-r", "requirements.txt")
    found = run(py, "-c", "import activations; print(activations.__file__)", cwd=tmp_path)
    assert found.stdout.strip().startswith(os.path.join(ROOT, "activations"))
    model = make_hf(tmp_path / "model", "gqa")  # 3 blocks
    data = tmp_path / "prompts.csv"
    data.write_text("idx,plus_prompt,minus_prompt,label\n" + "".join(
        f"q{i},Is {i} even? Yes,Is {i} even? No,{int(i % 2 == 0)}\n" for i in range(6)))
    tok = os.path.join(model, "tokenizer.json")
    run(py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "example.py",
        "--ckpt_dir", model, "--tokenizer_path", tok, "--save_activations_path",
        tmp_path / "boolq", "--prompt_csv", data)
    run(py, "scripts/cache_activations.py", "--model", model, "--data", data, "--layers", "1,2",
        "--output", tmp_path / "cached", "--dtype", "bfloat16")
    from activations.cache import ActivationCache

    seed = ActivationCache(str(tmp_path / "boolq"))
    cached = ActivationCache(str(tmp_path / "cached"))
    assert seed.num_examples == cached.num_examples == 6 and seed.token == "last"
    assert cached.layers == [1, 2] and cached.dtype == "bfloat16" and cached.token == "all"
