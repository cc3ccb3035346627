"""LoraSpec: the static (hashable) settings of a LoRA adapter.

Kept apart from the adapter math so that models can read it without importing the PEFT io code.
"""

from __future__ import annotations

import dataclasses
import math
import re


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Static LoRA settings.

    rank: default rank r (per-module ranks may differ: the forward pass reads r from `lora_a`).
    alpha: scaling numerator; scale = alpha / r, or alpha / sqrt(r) with `use_rslora`.
    targets: regex matched (`re.search`) against '/'-joined module paths such as
      'layers_0/attn/q_proj'.
    dropout: dropout rate on the adapter input.
    use_rslora: rank-stabilised scaling (Kalajdzievski, 2023).
    rank_pattern / alpha_pattern: tuples of (regex, value) overriding rank / alpha per module,
      first match wins (PEFT's `rank_pattern` / `alpha_pattern`).
    """

    rank: int = 8
    alpha: float = 16.0
    targets: str = r"(q_proj|k_proj|v_proj|o_proj)$"
    dropout: float = 0.0
    use_rslora: bool = False
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"LoraSpec.rank must be positive, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSpec.dropout must be in [0, 1), got {self.dropout}")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ValueError(f"LoraSpec.targets is not a valid regex: {self.targets!r}: {e}")

    def matches(self, path: str) -> bool:
        return re.search(self.targets, path) is not None

    def rank_for(self, path: str) -> int:
        for pattern, r in self.rank_pattern:
            if re.search(pattern, path):
                return int(r)
        return self.rank

    def alpha_for(self, path: str) -> float:
        for pattern, a in self.alpha_pattern:
            if re.search(pattern, path):
                return float(a)
        return float(self.alpha)

    def scale(self, path: str, rank: int) -> float:
        """alpha / r (or alpha / sqrt(r) with rsLoRA) for the module at `path` with rank `rank`."""
        alpha = self.alpha_for(path)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank
