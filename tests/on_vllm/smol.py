"""SmolLM2-135M-Instruct as a Hugging Face folder for the vLLM tests: `python -m llama.convert
GGUF DIR --to hf` once into ~/.cache/llama-ccs/test-hf/ (a fixed path, so vLLM's compile cache,
keyed by the model's path among its settings, is reused from one run to the next)."""
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def smol_hf() -> str:
    from llama.gguf import default_model_path

    gguf = default_model_path()
    st = os.stat(gguf)
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama-ccs"
    out = root / "test-hf" / f"{gguf.stem}-{st.st_size}-{st.st_mtime_ns}"
    if not (out / "config.json").is_file() or not (out / "model.safetensors").is_file():
        subprocess.run([sys.executable, "-m", "llama.convert", str(gguf), str(out), "--to", "hf",
                        "--overwrite"], cwd=ROOT, check=True, capture_output=True, timeout=900)
    return str(out)
