"""Offline data preparation, run once before training: ``python -m datamodules.prepare COMMAND``
(:mod:`datamodules.prepare.__main__` lists the commands)."""
