"""Every alignment objective as a pure, jit-able function.

Import losses by name (`from jaxalign.losses import dpo_loss`) or select them by a config string
through `REGISTRY[name]` (TRL's `loss_type` names where TRL has one).
"""

from jaxalign.losses import (
    kto as _kto,
    policy_gradient as _pg,
    preference as _preference,
    reference_free as _reference_free,
    reward as _reward,
    sft as _sft,
)
from jaxalign.losses.combine import *  # noqa: F401,F403
from jaxalign.losses.kto import *  # noqa: F401,F403
from jaxalign.losses.logps import (  # noqa: F401
    reduce_sequence, sequence_logps, token_logps, token_logps_from_hidden,
)
from jaxalign.losses.policy_gradient import *  # noqa: F401,F403
from jaxalign.losses.preference import *  # noqa: F401,F403
from jaxalign.losses.reference_free import *  # noqa: F401,F403
from jaxalign.losses.reward import *  # noqa: F401,F403
from jaxalign.losses.sft import *  # noqa: F401,F403

REGISTRY = {}
for _module in (_preference, _reference_free, _kto, _reward, _sft, _pg):
    for _name, _fn in _module.LOSSES.items():
        if _name in REGISTRY and REGISTRY[_name] is not _fn:
            raise ImportError(f"loss name {_name!r} registered twice")
        REGISTRY[_name] = _fn
REGISTRY.setdefault("sft", REGISTRY["nll"])
del _module, _name, _fn
