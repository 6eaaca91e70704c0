"""Bounds of config fields, declared beside each config and checked in one place (training
runs, tenant files, `serve`, `gateway`): field -> (test, what the value must be). A value out
of bounds is a one-line error naming where it came from: its flag, or FILE:KEY."""

from peftkit.errors import PeftkitError


def at_least(low: float, note: str = ""):
    return (lambda v: v >= low, f">= {low:g}{note}")


def above(low: float, note: str = ""):
    return (lambda v: v > low, f"> {low:g}{note}")


def flag_name(field: str) -> str:
    """A config field's command-line flag: `max_body_mb` -> --max-body-mb, a trailing `_s`
    (seconds) dropped: `slot_wait_s` -> --slot-wait."""
    return "--" + field.removesuffix("_s").replace("_", "-")


def check_bounds(values: dict, bounds: dict, where=flag_name) -> None:
    for key, value in values.items():
        if key in bounds and not bounds[key][0](value):
            raise PeftkitError(f"{where(key)}: must be {bounds[key][1]}, got {value}")
