"""python -m jaxalign.rl --config experiments/grpo.py:tiny [--config.rl.group_size=4 ...]"""

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "online experiment config file[:arg]",
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
    from jaxalign.rl.run import run

    result = run(_CONFIG.value)
    last = result["history"][-1] if result["history"] else {}
    print(f"[done] output in {result['output_dir']}; last round: "
          + ", ".join(f"{k}={last[k]:.4f}" for k in ("reward", "kl", "entropy") if k in last))
    for k, v in result["task"].items():
        print(f"[task] {k}: accuracy {v['accuracy']:.3f} (n={v['n']})")
    for k, v in result["export"].items():
        print(f"[export] {k}: {v}")


if __name__ == "__main__":
    app.run(main)
