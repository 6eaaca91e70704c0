"""peftkit: plan, train, serve and compare adaptations of one frozen base model."""

from peftkit.errors import PeftkitError

__all__ = ["PeftkitError"]
__version__ = "0.1.0"
