"""Datasets: parse and validate user files, then tokenize for causal LM or classification."""

from peftkit.data.records import Dataset, Record, load_dataset
from peftkit.data.tokenize import (IGNORE, Example, Tokenized, chat_ids, chat_prompt, split,
                                    tokenize)

__all__ = ["Dataset", "Record", "load_dataset", "IGNORE", "Example", "Tokenized", "chat_ids",
           "chat_prompt", "split", "tokenize"]
