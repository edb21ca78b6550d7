"""What a steering setting costs the model on text that is not about the behaviour.

nll_delta = mean negative log-likelihood per token (nats) of a neutral text set under the steer,
minus the same unsteered: 0 when the setting leaves ordinary text alone, large when it breaks
fluency. Every position of a text is steered (the residual stream the model reads the text
with). Token-weighted: total NLL over total predicted tokens, BOS not predicted. The texts:
--capability FILE (a JSON list of strings, or one text a line), by default NEUTRAL below
(written for this project: plain descriptive sentences with no sentiment, no test-taking and no
A/B format).
"""
from typing import Dict, List, Sequence

import torch

from llama.errors import LlamaError

NEUTRAL = [
    "The library opens at nine in the morning and closes at six in the evening.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The train to the coast leaves from platform four every hour.",
    "A triangle has three sides, and its angles add up to one hundred and eighty degrees.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Most maps show north at the top of the page.",
    "The meeting was moved from Tuesday to Thursday afternoon.",
    "Copper is a metal that conducts heat and electricity.",
    "The bus stops at the corner of the main street and the park.",
    "A week has seven days, and a year has twelve months.",
    "The report lists the sales figures for each region in a table.",
    "Rivers carry sand and small stones down to the sea.",
]


def read_texts(path: str) -> List[str]:
    """--capability FILE: a JSON list of strings, or one text per non-blank line."""
    from .items import read_texts as read

    return read(path, "--capability")


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """logits [B, S, vocab], ids [S] -> [B] summed NLL (nats) of ids[1:] given what precedes."""
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    target = ids[1:].to(logits.device).expand(logits.shape[0], -1)
    return -logp.gather(-1, target[..., None])[..., 0].sum(-1)


@torch.inference_mode()
def nll_delta(model, texts: Sequence[List[int]], vectors: Dict[int, torch.Tensor],
              multipliers: Sequence[float], ablate: bool = False) -> tuple:
    """(base NLL per token, {layer: [M] NLL per token steered - base}) over `texts` (token ids,
    BOS included), each layer steered alone with every multiplier (one batch of M rows; the
    blocks below the first steered layer run once, unsteered)."""
    from llama.model import Steer

    layers = sorted(vectors)
    mults = torch.tensor(list(multipliers), dtype=torch.float32)
    M = len(mults)
    base, steered, count = 0.0, {l: torch.zeros(M, dtype=torch.float64) for l in layers}, 0
    for ids in texts:
        if len(ids) < 2:
            raise LlamaError("a capability text has fewer than 2 tokens: nothing to predict")
        tokens = torch.tensor([ids])
        pre = model(tokens, layers=[layers[0]], logits=True)
        base += float(token_nll(pre["logits"], tokens[0])[0])
        entry = (layers[0], pre[layers[0]].expand(M, -1, -1))
        for l in layers:
            out = model(tokens.expand(M, -1), layers=[], logits=True, entry=entry,
                        steer=Steer({l: vectors[l]}, mults, ablate, "all"))
            steered[l] += token_nll(out["logits"], tokens[0]).cpu()
        count += len(ids) - 1
    return base / count, {l: (s / count - base / count).numpy() for l, s in steered.items()}
