"""Up-front checks of the datasets a run reads, so that a bad dataset name, split or feature key is a one-line
DataError before the run writes anything, rather than a failure at its first batch or first evaluation
(train.run calls check_train_sources; the evaluators check their own sets when built: eval_data.check_section)."""

from clip_jax.input import decode, pipeline


def check_features(source, name: str, features) -> None:
    """Raise a one-line DataError when the first record of `source` lacks a feature; `features` holds
    (config key, feature) pairs. A bad data.text_key would otherwise only show as every record skipped."""
    try:
        record = source[0] if len(source) else None
    except Exception:  # noqa: BLE001  an unreadable first record is counted and skipped later, like any other
        return
    if isinstance(record, dict) and decode.UNREADABLE in record:  # the same, behind pipeline._SafeSource
        return
    for key, feature in features if isinstance(record, dict) else ():
        if pipeline.field(record, feature) is None:
            raise pipeline.DataError(f"{name} has no feature {key}={feature!r}; its features are {sorted(record)}")


def check_train_sources(cfg) -> None:
    """Open every training dataset (data.shards, data.name or data.mixture) and check its first record has data.image_key and
    data.text_key: one-line DataErrors before a run writes anything, rather than at its first batch."""
    features = (("data.image_key", cfg.data.image_key), ("data.text_key", cfg.data.text_key))
    for name, source, _ in pipeline.train_sources(cfg):
        check_features(source, name, features)
