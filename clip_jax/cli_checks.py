"""Command-line checks of `--config=...` and `--config.<key>=...` flags, run before absl/config_flags parse them
(config_flags would die with a traceback on an unknown key or a broken config file; these give one line)."""

import difflib

from clip_jax.config import ConfigError, _flatten, base, known_keys


def check_override_keys(argv, cfg=None) -> None:
    """Reject `--config.<key>=...` flags naming a key that the config (`cfg`, the loaded config file; base() when
    None) lacks, a whole section, or a value absl cannot parse, before absl/config_flags sees them (they would fail
    with a traceback or a usage dump). An evals.<name> section's keys are those of its evaluator type."""
    known = _flatten(base()) if cfg is None else known_keys(cfg)
    for arg in argv:
        if arg.startswith("--config."):
            key = arg[len("--config.") :].split("=", 1)[0]
            if key not in known and not any(k.startswith(key + ".") for k in known):
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"unknown config key '{key}' in {arg}{hint}")
            value = arg.split("=", 1)[1] if "=" in arg else None
            if key not in known:  # a whole section (absl would stop with a usage dump)
                first = next(k for k in known if k.startswith(key + "."))
                raise ConfigError(f"config key '{key}' is a section; set its keys, e.g. --config.{first}")
            if value is not None and not _parses_as(value, known[key]):
                kind = type(known[key]).__name__
                raise ConfigError(f"config key '{key}' must be {kind}, got {value!r} in {arg}")


def _parses_as(text: str, ref) -> bool:
    """Whether absl can parse `text` for a key whose default is `ref` (if not, it exits with a usage dump)."""
    try:
        if isinstance(ref, bool):
            return text.lower() in ("true", "false", "t", "f", "1", "0")
        if isinstance(ref, (int, float)):
            type(ref)(text)
        return True
    except ValueError:
        return False


def check_config_file(argv):
    """Load `--config=path[:arg]` once up front so a missing file or a bad variant argument is one line, not
    config_flags' nested traceback. Returns the config (None without a --config flag)."""
    import importlib.util
    import os

    for arg in argv:
        if arg.startswith("--config="):
            path, _, variant = arg[len("--config=") :].partition(":")
            if not os.path.isfile(path):
                raise ConfigError(f"config file '{path}' does not exist (in {arg})")
            try:
                spec = importlib.util.spec_from_file_location("_clip_jax_config_check", path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                return module.get_config(*([variant] if variant else []))
            except Exception as e:  # noqa: BLE001  (any failure of the config file, on one line)
                raise ConfigError(f"config {arg[len('--config=') :]} failed: {type(e).__name__}: {e}") from None
