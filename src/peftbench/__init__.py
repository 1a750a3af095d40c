"""peftbench: measure which parameter-efficient fine-tuning method fits your task and data."""

__version__ = "0.1.0"
