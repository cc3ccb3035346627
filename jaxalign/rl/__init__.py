"""Online alignment: rollouts with the jitted KV-cache sampler, reward sources, and GRPO, RLOO, PPO,
online / iterative DPO, RSO and best-of-N trainers sharing one round loop.

    python -m jaxalign.rl --config experiments/grpo.py:tiny

Library use: `jaxalign.rl.trainers.*_trainer(...)` -> `Trainer`; `jaxalign.rl.loop.run_rounds`.
"""

from jaxalign.rl.loop import RoundTools, Trainer, minibatches, run_rounds  # noqa: F401
from jaxalign.rl.rewards import (  # noqa: F401
    RewardSource, exact_match_source, format_source, python_source, score_with,
)
from jaxalign.rl.rollout import PromptStream, Rollout, generate, rollout_metrics  # noqa: F401
