"""Probes on an activation cache, one job per file: solvers.py (batched L-BFGS, CCS, logistic
regression, top principal component), methods.py (one registration per method), metrics.py,
data.py (labels, groups, streamed chunks of layers, splits), train.py (the streaming loop),
report.py (eval.csv, summary, saved probes, plots). `ccs.py` is the command door."""
