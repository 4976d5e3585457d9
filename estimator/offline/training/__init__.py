"""`t2serve train`: per-layer probes (probes), the head fit and report (head_fit), the margin, gate and stopping-table fits."""
