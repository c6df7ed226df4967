"""Training recipes of the built-in shapes world: pretraining its two tiny diffusion models and
its learned preference reward. They use models/ and rewards/, so they live above them, not in the
leaf package ``capo.shapes``."""
