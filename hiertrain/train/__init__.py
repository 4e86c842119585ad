"""The training runtime: models, segments, optimizers, a group's compute and the in-process reference, data and checkpoints."""
