"""Prompt encoding with T5, exactly as ``IFPipeline.encode_prompt`` does it.

77 tokens, padded to that length, truncated beyond it, the attention mask passed to T5, prompts
lower-cased and stripped (``clean_caption=False``); the negative embedding is the empty prompt
encoded the same way.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from illusions.models import load_text_encoder_parts

logger = logging.getLogger(__name__)

# IF's T5 was trained on 77-token sequences (IFPipeline.encode_prompt hard-codes it too).
MAX_LENGTH = 77


def style_prompts(prompts: Sequence[str], style: str = "") -> list[str]:
    """Prepend ``style`` to each prompt as the reference's generate.py does."""
    return [f"{style} {p}".strip() for p in prompts]


@dataclass
class TextEncoder:
    """T5 encoder + tokenizer. ``encode`` gives ``prompt_embeds`` and the null-prompt embedding."""

    tokenizer: Any  # transformers tokenizer, or None for random-weight benchmarks
    model: Any  # transformers.T5EncoderModel
    device: torch.device
    dtype: torch.dtype
    # A fast tokenizer keeps its padding and truncation settings in shared state, which each call
    # sets: concurrent calls (a service's request threads) would mix up each other's settings.
    _tokenizer_lock: threading.Lock = field(default_factory=threading.Lock, repr=False,
                                            compare=False)

    @classmethod
    def from_pretrained(cls, source: str, *, device: torch.device | str = "cpu",
                        dtype: torch.dtype | str = torch.float32, quantize: str = "none",
                        random_weights: bool = False) -> TextEncoder:
        tokenizer, model = load_text_encoder_parts(
            source, device=device, dtype=dtype, quantize=quantize, random_weights=random_weights
        )
        param = next(model.parameters())
        return cls(tokenizer, model, torch.device(device), param.dtype
                   if param.is_floating_point() else torch.float32)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.d_model)

    def _tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            # Random-weight benchmarks have no tokenizer files: deterministic byte ids stand in
            # (same shapes and FLOPs; the words mean nothing to random weights anyway).
            vocab = int(self.model.config.vocab_size)
            ids = torch.zeros(len(texts), MAX_LENGTH, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, text in enumerate(texts):
                codes = [2 + b % (vocab - 2) for b in text.encode()][: MAX_LENGTH - 1] + [1]
                ids[row, : len(codes)] = torch.tensor(codes)
                mask[row, : len(codes)] = 1
            return ids, mask
        with self._tokenizer_lock:
            return self._tokenize_locked(texts)

    def _tokenize_locked(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.tokenizer(
            texts,
            padding="max_length",
            max_length=MAX_LENGTH,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        full = self.tokenizer(texts, padding="longest", return_tensors="pt").input_ids
        if full.shape[-1] > MAX_LENGTH:
            logger.warning("prompts longer than %d tokens were truncated", MAX_LENGTH)
        return inputs.input_ids, inputs.attention_mask

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Encode texts (lower-cased, stripped) -> (N, 77, D) in the encoder's dtype."""
        texts = [t.lower().strip() for t in texts]
        ids, mask = self._tokenize(texts)
        out = self.model(ids.to(self.device), attention_mask=mask.to(self.device))[0]
        return out.to(self.dtype)

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(prompt_embeds (N,77,D), negative_prompt_embeds (1,77,D))``.

        The negative is the empty prompt, encoded once: the samplers repeat it per view.
        """
        if not prompts:
            raise ValueError("prompts is empty: give one prompt per view")
        embeds = self.embed(list(prompts) + [""])
        return embeds[:-1], embeds[-1:]
