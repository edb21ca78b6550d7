"""Steered models by name: `--alias NAME=SPEC` makes `model: NAME` mean the served model steered
by SPEC, so a client that can only choose a model (lm-eval, LangChain, Inspect, chat pages)
evaluates a steered model, log-likelihood requests included.

    limits.aliases = read_aliases(["sent=sentiment:10,14:0.25:residual"], limits)
    # a request for model "sent" is then steered so (server/schemas.py check_model)

SPEC is `VECTOR:LAYERS:MULTIPLIER[:SCALE]` (layers comma-separated; SCALE raw, the default, or
residual) or a JSON object of the full steering settings (the request field `steering`: vector,
layers, multiplier, scale, ablate, positions), e.g.
`abl={"vector": "v", "layers": [10], "ablate": true}`. Each is checked at start-up as a request's
`steering` is (server/schemas.py `steering`). A request for an alias that also carries its own
`steering` is refused (400): the alias already says how the model is steered.
"""
import json
from typing import Dict, List

from llama.errors import LlamaError

from steering.settings import SteerSettings

from .schemas import ApiError, Limits, steering


def _spec(text: str, entry: str) -> dict:
    """SPEC's text -> a `steering` object (not yet checked)."""
    if text.lstrip().startswith("{"):
        try:
            spec = json.loads(text)
        except ValueError as e:
            raise LlamaError(f"--alias {entry}: the settings are not valid JSON ({e})") from None
        if not isinstance(spec, dict):
            raise LlamaError(f"--alias {entry}: expected a JSON object of steering settings")
        return spec
    parts = text.split(":")
    if len(parts) not in (3, 4) or not all(parts):
        raise LlamaError(f"--alias {entry}: expected NAME=VECTOR:LAYERS:MULTIPLIER[:SCALE] or "
                         "NAME={JSON steering settings}")
    try:
        layers = [int(x) for x in parts[1].split(",")]
    except ValueError:
        raise LlamaError(f"--alias {entry}: layers {parts[1]!r} are not comma-separated "
                         "integers") from None
    try:
        multiplier = float(parts[2])
    except ValueError:
        raise LlamaError(f"--alias {entry}: multiplier {parts[2]!r} is not a number") from None
    spec = {"vector": parts[0], "layers": layers, "multiplier": multiplier}
    if len(parts) == 4:
        spec["scale"] = parts[3]
    return spec


def read_aliases(entries: List[str], limits: Limits) -> Dict[str, SteerSettings]:
    """--alias entries -> {name: checked steering settings}, in the order given. LlamaError
    (one line naming the entry) for a bad entry, a name used twice or the served model's own."""
    out = {}
    for entry in entries:
        name, eq, text = entry.partition("=")
        name = name.strip()
        if not eq or not name or not text:
            raise LlamaError(f"--alias {entry}: expected NAME=VECTOR:LAYERS:MULTIPLIER[:SCALE]")
        if name == limits.model_id or name in out:
            raise LlamaError(f"--alias {entry}: the name {name!r} is taken (the served model or "
                             "another alias)")
        try:
            out[name] = steering(_spec(text, entry), limits)
        except ApiError as e:
            raise LlamaError(f"--alias {entry}: {e.message}") from None
    return out


def model_list(limits: Limits) -> List[dict]:
    """GET /v1/models entries: the served model, then each alias with its steering settings."""
    base = {"object": "model", "created": 0, "owned_by": "llama-ccs", "context": limits.context}
    out = [{"id": limits.model_id, **base}]
    for name, spec in limits.aliases.items():
        out.append({"id": name, **base, "root": limits.model_id, "steering": spec.to_json()})
    return out
