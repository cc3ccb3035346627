"""LoRA / rsLoRA adapters (init, apply, merge, counts), PEFT adapter io, host-offloaded optimizer state."""

from jaxalign.peft.lora import (  # noqa: F401
    adapted_modules, count_params, init_lora, linear_modules, lora_apply_fn, lora_targets,
    merge_lora, print_trainable_parameters, select_modules, unmerge_lora,
)
from jaxalign.peft.offload import (  # noqa: F401
    device_shardings, host_offload_available, memory_kinds, offload_shardings, offloaded_step,
    supported_memory_kinds,
)
from jaxalign.peft.peft_io import load_peft_adapter, save_peft_adapter  # noqa: F401
from jaxalign.peft.spec import LoraSpec  # noqa: F401
