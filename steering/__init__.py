"""Interventions on the residual stream, measured: the steering sweep (`sweep`), the residual
scale and push (`scale`), the capability cost (`capability`), the sweep's outputs (`report`), the
open-ended read-out (`open_ended`) and the sentiment positive control's contrast set
(`sentiment`). Imports `llama/`; `llama/` never imports this package."""
