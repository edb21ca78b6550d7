"""Write steering vectors as a llama.cpp control-vector GGUF, to steer the same model there:

    python scripts/export_control_vector.py --model PATH --vectors DIR --layers 10,15 \\
        --output steer.gguf [--multiplier 1.0]
    llama-cli -m model.gguf --control-vector-scaled steer.gguf:4 ...      # current llama.cpp
    llama-cli -m model.gguf --control-vector-scaled steer.gguf 4 ...      # older builds

llama.cpp's syntax: current builds (the option table in common/arg.cpp) take one argument
`FNAME:SCALE`, several comma-separated (`a.gguf:0.5,b.gguf:2`); older builds (the hand-written
parser in common/common.cpp) took two, `FNAME SCALE`. `--control-vector FNAME` (scale 1) is the
same in both.

--vectors: any source llama/vectors.py reads (a vectors folder, a .npy/.safetensors file with
--layers, a saved linear probe), checked against --model (width, layers, fingerprint).

Layer offset, read from llama.cpp's source (common/common.cpp `llama_control_vector_load_one`,
src/llama-adapter.cpp, and the graph builders' `cvec.apply_to(ctx0, cur, il)`): tensor
`direction.N` (N >= 1; N = 0 is refused by the loader) is added to the output of the block of
0-based index N, which is this project's layer N + 1 (layer L = output of block L, counted from
1). So layer L is written as `direction.{L-1}`; layers 0 (the embedding output) and 1 have no slot
in llama.cpp and are refused. Tensors are float32 [dim]; the file's architecture is
"controlvector" with `controlvector.model_hint` and `controlvector.layer_count`, as llama.cpp's
own cvector-generator writes.

Conventions (llama.vectors.describe_vector) travel in the header as strings, one key per layer
and field: `llama_ccs.layer_{L}.{field}` (operation, layer_convention, token, norm,
residual_norm, source_data, fingerprint, plus_class, plus_side, ...) and
`llama_ccs.layer_{L}.tensor` (its `direction.{L-1}` name), with `llama_ccs.multiplier` (the
factor baked into the tensors). llama.cpp ignores keys it does not know.
"""
import os
import sys


from llama.cli import command
from llama.errors import LlamaError

ARCH = "controlvector"


def gguf_name(layer: int) -> str:
    """The llama.cpp tensor name of this project's layer (output of block `layer`)."""
    if layer < 2:
        raise LlamaError(f"layer {layer}: llama.cpp control vectors start at the output of block "
                         "2 (direction.1); layers 0 and 1 cannot be exported")
    return f"direction.{layer - 1}"


def export(vectors: dict, output: str, multiplier: float = 1.0, model_hint: str = "llama",
           conventions: dict = None):
    """vectors {layer: [dim] tensor} -> a control-vector GGUF at `output` (written whole or not
    at all); conventions {layer: {field: str}} go into the header (module docstring)."""
    import gguf
    import numpy as np

    names = {l: gguf_name(l) for l in sorted(vectors)}
    tmp = output + ".tmp"
    writer = gguf.GGUFWriter(tmp, ARCH)
    writer.add_string(f"{ARCH}.model_hint", model_hint)
    writer.add_uint32(f"{ARCH}.layer_count", len(vectors))
    writer.add_float32("llama_ccs.multiplier", float(multiplier))
    for l, name in names.items():
        writer.add_string(f"llama_ccs.layer_{l}.tensor", name)
        for key, value in sorted((conventions or {}).get(l, {}).items()):
            if value != "":
                writer.add_string(f"llama_ccs.layer_{l}.{key}", str(value))
    for l, name in names.items():
        writer.add_tensor(name, (vectors[l].numpy() * multiplier).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, output)
    return names


def main(model, vectors, output, layers=None, multiplier=1.0):
    """Write steering vectors as a llama.cpp control-vector GGUF (see the module docstring).

    model: the model the vectors are for (checked: width, layers, fingerprint)
    vectors: a vectors folder, a .npy/.safetensors vector or a saved linear probe
    output: the .gguf file to write
    layers: which layers (default: every layer the vectors have), from 2 on
    multiplier: the vectors are scaled by it
    """
    from activations.cache import parse_layers
    from llama.checkpoint import fingerprint, open_source
    from llama.vectors import load_vectors, vector_conventions

    src, _, _ = open_source(str(model))
    a = src.args
    if layers is not None:
        layers = parse_layers(layers, a.n_layers)
    vecs = load_vectors(vectors, layers, a.dim, a.n_layers, fingerprint(src, a))
    for l in vecs:
        gguf_name(l)
    names = export(vecs, output, float(multiplier), conventions=vector_conventions(vectors))
    print(f"wrote {len(names)} control vectors to {output}: "
          + ", ".join(f"layer {l} -> {n}" for l, n in names.items()))


def cli():
    """The command line."""
    command(main)
