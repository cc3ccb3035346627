"""Alignment-tax toolkit and analysis.

- `tax`: capability-regression evaluation (held-out capability / aligned-task sets, the tax report).
- `nspo`: null-space projection of alignment updates against capability gradients (NSPO).
- `averaging`: heterogeneous (layer-wise) model averaging and the alignment-capability Pareto front.
- `spectral`: SVD of fine-tuning updates, intruder dimensions.
- `dynamics`: learning dynamics of probe responses (the squeezing effect).
- `study`: the end-to-end alignment-tax study (`python -m jaxalign.analysis.study`).
"""

from jaxalign.analysis import averaging, dynamics, nspo, spectral, tax  # noqa: F401
from jaxalign.analysis.tax import alignment_tax, make_tax_evaluator  # noqa: F401
