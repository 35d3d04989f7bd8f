"""Model families by config name (model.family): an explicit table, so adding a family is one line here plus its
module. state.build_model builds from it; config_checks validates model.family against its keys."""

from clip_jax.models import coca, two_tower

MODELS = {"two_tower": two_tower.TwoTower, "coca": coca.CoCa}
