"""selfimprove: make small language models reason better by learning from their own samples."""

__version__ = "0.1.0"
