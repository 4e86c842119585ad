"""The training runtime: models, segments, optimizers, the roles, data and checkpoints."""
