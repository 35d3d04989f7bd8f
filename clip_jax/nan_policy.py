"""The config key nan_policy: what training does after a step whose loss or gradients are NaN/Inf.

Whatever the policy, that step's update is never applied (train.train_step keeps the previous state). Then
train._check_nonfinite, before every log line and every checkpoint, applies the policy:
  stop: the run ends with a one-line error naming the bad step and the last good checkpoint; nothing trained
        after the bad step is saved.
  skip: the step is logged as a warning, counted in the `skipped_steps` metric, and training goes on.
A module of its own so that config_checks can import the vocabulary without importing train.
"""

POLICIES = ("stop", "skip")
STOP, SKIP = POLICIES
