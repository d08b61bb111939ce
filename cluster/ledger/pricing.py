"""Prices and money: integer micro-dollars everywhere, so sums are exact and nothing is lost to floats."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

MICRO = 1_000_000  # micro-dollars per dollar


@dataclass(frozen=True)
class Pricing:
    """Micro-dollars per million tokens (the default: $2 in, $6 out, OpenRouter's Mixtral 8x22B price)."""

    input_micro_per_million: int = 2_000_000
    output_micro_per_million: int = 6_000_000

    def __post_init__(self) -> None:
        for name in ("input_micro_per_million", "output_micro_per_million"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, not {value!r}")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> int:
        """Micro-dollars for this many tokens, rounded up (a request is never charged less than its price)."""
        if prompt_tokens < 0 or completion_tokens < 0:
            raise ValueError(f"token counts must be >= 0, not {prompt_tokens}, {completion_tokens}")
        total = prompt_tokens * self.input_micro_per_million + completion_tokens * self.output_micro_per_million
        return -(-total // 1_000_000)


def parse_dollars(text: str) -> int:
    """'12.5' -> 12_500_000 micro-dollars, through Decimal. More than 6 decimals is an error, not a rounding."""
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise ValueError(f"not an amount of dollars: {text!r}") from None
    if not value.is_finite():
        raise ValueError(f"not an amount of dollars: {text!r}")
    micro = value * MICRO
    if micro != micro.to_integral_value():
        raise ValueError(f"{text!r} has more than 6 decimals (credits are counted in micro-dollars)")
    return int(micro)


def format_dollars(micro: int) -> str:
    """12_500_000 -> '12.500000'."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO)
    return f"{sign}{whole}.{frac:06d}"
