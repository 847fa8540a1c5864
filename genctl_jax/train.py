"""Train any config: `python -m genctl_jax.train --config configs/X.py[:arg] --workdir DIR`.

Override any field with `--config.a.b=value`. Re-running on the same workdir resumes
from its latest checkpoint.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from genctl_jax import cli
from genctl_jax.parallel import distributed

config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv

    def train():
        distributed.initialize()
        from genctl_jax.trainers.loop import train_and_evaluate

        logging.info(distributed.process_summary())
        train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)

    cli.run(train)


if __name__ == "__main__":
    app.run(main)
