"""llama-ccs from Python: `import llama_ccs as lc`, then lc.load, lc.hidden_states, lc.extract,
lc.train_probes, lc.generate (llama_ccs/notebook.py); `llama-ccs COMMAND` on the command line
(llama_ccs/main.py)."""
from .notebook import Model, default_model, extract, generate, hidden_states, load, train_probes

__all__ = ["Model", "default_model", "extract", "generate", "hidden_states", "load",
           "train_probes"]
