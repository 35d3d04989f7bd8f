"""Evaluation: zero-shot classification, image<->text retrieval, linear probes and captioning.

Each evaluator is a class (zero_shot.ZeroShot, retrieval.Retrieval, linear_probe.LinearProbe,
captioning.Captioning) built once per run from one `evals.<name>` config section (sections.py: the keys of each
type); suite.Suite builds every configured one and runs them on a set of parameters, and suite.evaluate_checkpoint
on a saved run; benchmark.py evaluates one checkpoint on a list of zero-shot datasets. This package's __init__
imports nothing, so config.py can read sections.py without importing JAX.
"""
