"""Sampling options shared by the torch and onnxruntime generators (no torch import: deployment needs none)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingOptions:
    """How to pick each next token. ``temperature == 0`` means greedy (argmax)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos_id: int | None = None
    seed: int = 0
    # llama.cpp's (and Ollama's) repeat penalty: every token among the last ``repeat_last_n`` of prompt and
    # answer has its logit divided by ``repeat_penalty`` when positive, multiplied when negative; 1: none.
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64  # 0: none; -1: the whole context

    @property
    def penalizes(self) -> bool:
        return self.repeat_penalty != 1.0 and self.repeat_last_n != 0

    def repeat_window(self, context_length: int) -> int:
        """How many of the latest tokens the repeat penalty looks at."""
        return context_length if self.repeat_last_n == -1 else self.repeat_last_n

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be ≥ 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be ≥ 0, got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"top_k must be positive, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.repeat_penalty < float("inf"):
            raise ValueError(f"repeat_penalty must be a positive number, got {self.repeat_penalty}")
        if self.repeat_last_n < -1:
            raise ValueError(f"repeat_last_n must be ≥ -1 (-1: the whole context), got {self.repeat_last_n}")
