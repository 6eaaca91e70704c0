"""One trainer for full fine-tuning, feature extraction and every PEFT method.

The trainer's names load on first use (PEP 562), so `peftkit --help` and `peftkit plan`, which
need only the config, never import torch."""

from peftkit.train.config import METHODS, TrainConfig, load_config

__all__ = ["METHODS", "TrainConfig", "load_config", "Trainer", "TrainingInterrupted", "train"]


def __getattr__(name: str):
    if name in ("Trainer", "train"):
        from peftkit.train import trainer
        return getattr(trainer, name)
    if name == "TrainingInterrupted":
        from peftkit.train import loop
        return loop.TrainingInterrupted
    raise AttributeError(f"module 'peftkit.train' has no attribute '{name}'")
