"""The embedded default study of ``metalr ablate`` (``configs/ablate_default.yaml``, verbatim:
a test checks they agree), so the command works from any folder and from a wheel."""

TEXT = """\
# The embedded default study of `metalr ablate` (no --config): LR sensitivity on sklearn digits.
# command:  metalr ablate        (same as: metalr ablate --config configs/ablate_default.yaml)
# hardware: 2-core CPU, 1 torch thread, torch 2.13 CPU
# time:     ~50 s (120 runs of 300 full-batch steps, then the report; ~0.34 s of CPU a run);
#           --smoke: ~3 s. A rerun skips every recorded run ("120 cached, 0 run").
# expected: digits_mlp final val loss (mean of 3 seeds): Adam 0.090 at its best lr (1e-2), 0.78
#           at 1e-1, 176 at 1; AdamHD (seek rule) 0.110-0.123 from every lr0; SGD 0.079 (lr 1);
#           SGD-HD 0.081-0.083 from every lr0 (measured: experiments/results/ablate_default/report.md).
# Writes runs/ablate/ablate_default/{records.jsonl,curves/,report.md,summary.csv,*.png}.
name: ablate_default
tasks: [digits_logreg, digits_mlp]
size: smoke
steps: 300
log_every: 10
lrs: [1.0e-4, 1.0e-3, 1.0e-2, 1.0e-1, 1.0]
seeds: [0, 1, 2]
optimizers:
  adam: {kind: adam}
  adam_hd: {kind: adam_hd}
  sgd: {kind: sgd}
  sgd_hd: {kind: sgd_hd}
workers: 1
device: cpu
smoke:
  steps: 30
  lrs: [1.0e-3, 1.0e-1]
  seeds: [0]
"""
