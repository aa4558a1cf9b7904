"""Choosing the next token from logits: greedy, or sampling with a temperature and top-p (nucleus)
filtering, reproducible with a seed."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Sampler"]


@dataclass(frozen=True)
class Sampler:
    """How the next token is chosen (the arguments of :func:`sphinx_model.generate`).

    ``do_sample=False``: the most likely token (greedy; ``temperature`` and ``top_p`` unused, only
    their types checked).
    Sampling: logits divided by ``temperature`` (> 0), then only the smallest set of most likely
    tokens whose probabilities reach ``top_p`` (in (0, 1]; the most likely token is always kept, so
    ``top_p`` near 0 is greedy) is sampled from, renormalised. ``seed``: a fixed seed makes sampling
    reproducible (a generator on the logits' device); None draws from torch's global generator.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"do_sample must be a bool, got {self.do_sample!r}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not math.isfinite(value):
                raise TypeError(f"{name} must be a finite float, got {value!r}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature} (for "
                             "greedy decoding pass do_sample=False)")
        if self.do_sample and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] when sampling, got {self.top_p}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed must be None or an int, got {self.seed!r}")

    def generator(self, device: torch.device) -> torch.Generator | None:
        """A generator seeded with ``seed`` on ``device`` (None without a seed or when greedy)."""
        if not self.do_sample or self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)

    def __call__(self, logits: torch.Tensor, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        """int64 ``[m]``: one token per row of ``logits`` ``[m, V]`` (any float dtype; computed in
        float32)."""
        if not self.do_sample:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p >= 1:
            return torch.multinomial(probs, 1, generator=generator).squeeze(1)
        # Sorted by probability (stable: among equal ones the lower id first, as argmax), a token is
        # kept when the mass before it is still below top_p, so the first always is.
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= self.top_p, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(1, choice).squeeze(1)
