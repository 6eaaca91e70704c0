"""Command-line flags made from the things they set: a dataclass's fields become options (its
field comments their help), and the placement flags every model-loading command shares."""

import argparse

from peftkit.bounds import flag_name


def add_placement(s) -> None:
    """--device / --dtype / --attn, as `peftkit train` has them (TrainConfig's fields)."""
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    s.add_argument("--dtype", default="auto",
                   help="the base's precision: auto (bf16 on a GPU, else fp32) | float32 | "
                        "bfloat16 | float16")
    s.add_argument("--attn", default="auto",
                   help="auto (the model's own choice) | sdpa | eager | flash_attention_2")


def placement(args):
    """(device, dtype, attn) of a command, or a one-line error naming the flag."""
    from peftkit.device import placement as resolve
    return resolve(args.device, args.dtype, args.attn)


def add_config_flags(s, cls, choices: dict, config_defaults: bool = True, skip=(),
                     help_for: dict | None = None) -> None:
    """One flag per dataclass field (`max_body_mb` -> --max-body-mb, a trailing `_s` dropped:
    `slot_wait_s` -> --slot-wait), its comment as help text and `choices` as its values; a
    field without a default is a required flag, a tuple a comma-separated list. With
    `config_defaults` False every default is None, so a config file's values are overridden
    only by flags given."""
    from dataclasses import MISSING, fields
    docs = {**field_docs(cls), **(help_for or {})}
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = flag_name(f.name)
        required = f.default is MISSING and f.default_factory is MISSING
        default = None if required else f.default if f.default is not MISSING \
            else f.default_factory()
        doc = docs.get(f.name, "")
        shown = doc if required or f.name in (help_for or {}) else \
            f"{doc} (default: {_shown(default)})"
        kind = str(f.type)
        if kind in ("bool", "<class 'bool'>"):
            s.add_argument(flag, dest=f.name, action="store_const", const=True,
                           default=default if config_defaults else None, help=doc)
            continue
        if "tuple" in kind:
            convert = lambda text: tuple(x for x in text.split(",") if x)  # noqa: E731
        else:
            convert = int if "int" in kind else float if "float" in kind else str
        s.add_argument(flag, dest=f.name, type=convert, choices=choices.get(f.name),
                       required=required, default=default if config_defaults else None,
                       metavar=None if f.name in choices else f.name.removesuffix("_s").upper(),
                       help=shown)


def _shown(default) -> str:
    if default is None or default == ():
        return "none"
    return ",".join(default) if isinstance(default, tuple) else repr(default)


def config_from_args(cls, args):
    """The dataclass `add_config_flags` made the flags of, from the parsed arguments."""
    from dataclasses import fields
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def field_docs(cls) -> dict[str, str]:
    """A dataclass's field comments (`name: type = default  # doc`): the flags' help texts,
    written once, beside the field."""
    import inspect
    import re
    pattern = re.compile(r"^\s+(\w+): [^=#]+(?:= .*?)?#\s*(.+)$")
    return {m.group(1): m.group(2).strip() for line in inspect.getsource(cls).splitlines()
            if (m := pattern.match(line))}


def positive(text: str) -> int:
    """argparse type: a whole number >= 1 (sizes, counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
