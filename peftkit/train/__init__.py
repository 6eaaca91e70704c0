"""One trainer for full fine-tuning, feature extraction and every PEFT method."""

from peftkit.train.config import METHODS, TrainConfig, load_config
from peftkit.train.loop import Trainer, TrainingInterrupted, train

__all__ = ["METHODS", "TrainConfig", "load_config", "Trainer", "TrainingInterrupted", "train"]
