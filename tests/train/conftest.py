import pytest

from jaxalign.train.config import load_config

TINY = {
    "model.init.hidden_size": 32, "model.init.intermediate_size": 64,
    "model.init.num_hidden_layers": 1, "model.init.num_attention_heads": 2,
    "model.init.num_key_value_heads": 1,
    "data.num_examples": 64, "data.eval_examples": 16, "train.batch_size": 8,
    "train.steps": 4, "train.log_every": 1, "train.eval_every": 0, "train.eval_batches": 1,
    "train.checkpoint_every": 2, "train.async_checkpoint": False, "train.tensorboard": False,
    "train.progress": False, "train.plots": False, "optim.warmup_steps": 0,
}


@pytest.fixture
def tiny_config(tmp_path):
    def make(spec, **overrides):
        ov = {**TINY, "output_dir": str(tmp_path / spec.replace("/", "_").replace(":", "_")),
              **{k.replace("__", "."): v for k, v in overrides.items()}}
        return load_config(spec, ov)
    return make
