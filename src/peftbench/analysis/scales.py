"""Data scales: low / medium / high by train size (thresholds configurable)."""

from __future__ import annotations

from dataclasses import dataclass

from peftbench.errors import UsageError

SCALES = ("low", "medium", "high")


@dataclass(frozen=True)
class Scales:
    """``low < low_below <= medium < high_from <= high`` (train examples)."""

    low_below: int = 500
    high_from: int = 5000

    def __post_init__(self) -> None:
        if not 0 < self.low_below < self.high_from:
            raise UsageError(f"--scales {self.low_below},{self.high_from}: the thresholds "
                             "LOW,HIGH need 0 < LOW < HIGH, e.g. --scales 500,5000.")

    def of(self, size: int) -> str:
        if size < self.low_below:
            return "low"
        return "medium" if size < self.high_from else "high"

    def describe(self, scale: str) -> str:
        return {"low": f"< {self.low_below:,}",
                "medium": f"{self.low_below:,} - {self.high_from - 1:,}",
                "high": f">= {self.high_from:,}"}[scale]

    @classmethod
    def parse(cls, text: str) -> Scales:
        """``"500,5000"`` -> Scales(500, 5000)."""
        try:
            low, high = (int(part) for part in text.split(","))
        except ValueError:
            raise UsageError(f"--scales {text!r}: expected LOW,HIGH train sizes, "
                             "e.g. --scales 500,5000.") from None
        return cls(low, high)
