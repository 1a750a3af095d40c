"""Fine-tuning methods, one module each, registered by name."""

from peftbench.methods.base import Method, count_parameters
from peftbench.methods.registry import get_method, list_methods, register

__all__ = ["Method", "count_parameters", "get_method", "list_methods", "register"]
