"""A run's examples and what is checked of them before training: the train / validation split
(or --val-data), causal-LM examples truncated down to their prompt dropped, and the pre-flight
checks that would otherwise fail a run after its last step (validation data of another kind or
with unseen labels, rows over the model's context)."""

from peftkit.data import IGNORE, split, tokenize
from peftkit.errors import PeftkitError
from peftkit.methods.spec import virtual_at
from peftkit.train.config import TrainConfig


def examples_for(cfg: TrainConfig, ds, tok, task: str):
    """(train examples, validation examples, validation records, truncated count) of a run:
    its --val-data or a seeded split, less causal-LM examples truncated down to their prompt."""
    pairs = list(zip(tokenize(ds, tok, cfg.max_length).examples, ds.records))
    if cfg.val_data:
        vds = cfg.load_data(cfg.val_data)
        if task == "classify":
            vds.label_names = ds.label_names
        val = list(zip(tokenize(vds, tok, cfg.max_length).examples, vds.records))
        train = pairs
    else:
        train, val = split(pairs, cfg.val_split, cfg.seed)
    if task == "causal-lm":  # an example truncated down to its prompt teaches nothing
        kept = [p for p in train if any(t != IGNORE for t in p[0].labels[1:])]
        if train and not kept:
            raise PeftkitError(f"{cfg.data}: every example's answer is cut off at --max-length "
                               f"{cfg.max_length} (its prompt fills it); raise --max-length")
        train = kept
    if not train:
        raise PeftkitError(f"{cfg.data}: no training examples left after the split")
    truncated = sum(len(e.input_ids) >= cfg.max_length for e, _ in pairs)
    return [e for e, _ in train], [e for e, _ in val], [r for _, r in val], truncated


def check_val_data(cfg: TrainConfig, ds) -> None:
    """--val-data holds the training data's kind of records and, for a classifier, only
    labels the training data has (a head has no output for the others)."""
    vds = cfg.load_data(cfg.val_data)
    if vds.kind != ds.kind:
        raise PeftkitError(f"--val-data {cfg.val_data}: {vds.kind} records, but the training "
                           f"data's are {ds.kind}")
    unseen = sorted(set(vds.label_names) - set(ds.label_names))
    if unseen:
        raise PeftkitError(f"--val-data {cfg.val_data}: labels {unseen} never occur in "
                           f"{cfg.data} (its labels: {', '.join(map(str, ds.label_names))})")


def check_context(cfg: TrainConfig, config, examples) -> None:
    """Rows the model cannot hold (after truncation to --max-length, with prompt tuning's
    virtual tokens) are refused before training, not at its final evaluation."""
    context = getattr(config, "max_position_embeddings", None)
    virtual = cfg.num_virtual_tokens if virtual_at(cfg.method) == "input" else 0
    longest = max((len(e.input_ids) for e in examples), default=0)
    if context and longest + virtual > context:
        extra = f" + {virtual} virtual tokens" if virtual else ""
        raise PeftkitError(f"--max-length {cfg.max_length}: rows of {longest} tokens{extra} are "
                           f"over {cfg.model}'s {context}-token context; give --max-length "
                           f"{context - virtual} or less")
