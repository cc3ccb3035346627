"""python -m jaxalign.train --config experiments/dpo.py:tiny [--config.loss.beta=0.05 ...]"""

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file[:arg]",
                                          lock_config=True)


def main(argv):
    from absl import logging

    from jaxalign.host_memory import reuse_freed_memory

    reuse_freed_memory()  # before JAX starts its threads (jaxalign/host_memory.py)

    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config experiments/<name>.py[:variant] is required")
    from jaxalign.train.run import run

    result = run(_CONFIG.value)
    print(f"[done] output in {result['output_dir']}; eval: "
          + ", ".join(f"{k}={v:.4f}" for k, v in sorted(result["eval"].items())))
    for k, v in result["export"].items():
        print(f"[export] {k}: {v}")


if __name__ == "__main__":
    app.run(main)
