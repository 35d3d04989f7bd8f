"""Evaluators; `evaluate_checkpoint` runs them standalone on the latest checkpoint of a workdir."""


def evaluate_checkpoint(cfg, workdir: str) -> dict:
    from clip_jax import checkpoint as checkpoint_lib
    from clip_jax import optim, sharding, train
    from clip_jax.evaluate import zero_shot

    mesh = sharding.make_mesh(cfg)
    graphdef, abstract, shardings = train.state_shardings(cfg, mesh, optim.make(cfg))
    ckpt = checkpoint_lib.Checkpointer(workdir, cfg)
    restored = ckpt.restore(abstract, shardings, cfg)
    ckpt.close()
    if restored is None:
        raise train.TrainingError(f"no checkpoint in {ckpt.directory}; train first or point --workdir at a run")
    step, state, _ = restored
    return {"step": step, "zero_shot": zero_shot.evaluate(cfg, state["params"], graphdef, mesh)}
