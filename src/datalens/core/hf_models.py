"""Hugging Face ``transformers`` models built from a config, randomly initialised: nothing is
downloaded. The paper profiles' language model (``fact_tracing.model.name:
datalens.core.hf_models:causal_lm``) and text classifier (``text_classification.model.name:
datalens.core.hf_models:sequence_classifier``); train them, or load your own weights into them."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel


class CausalLM(nn.Module):
    """A GPT-2 architecture (Radford et al., 2019) as a module from token ids (B, L) (0 pads, at the
    end) to next-token logits (B, L, vocab_size).

    Made to compose with ``torch.func``: eager attention (the fused SDPA path and the mask it builds
    break ``vmap``); no attention mask is passed, because with padding at the end causal attention
    already keeps every real position from seeing it (padding positions are never scored); dropout
    is off and the inner model stays in eval mode, so stacked training under ``vmap`` draws no random
    numbers; the head is not tied to the embedding, so the state dict is its parameters."""

    def __init__(self, vocab_size: int, length: int, dim: int = 256, layers: int = 4, heads: int = 4):
        super().__init__()
        config = GPT2Config(vocab_size=vocab_size, n_positions=length, n_embd=dim, n_layer=layers, n_head=heads, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False,
                            attn_implementation="eager")
        self.lm = GPT2LMHeadModel(config).eval()
        self.vocab_size = vocab_size

    def train(self, mode: bool = True) -> "CausalLM":
        super().train(mode)
        self.lm.eval()  # no dropout to switch on, and none of its random draws under vmap
        return self

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=tokens).logits

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """A sequence's representation (B, dim): the mean of its non-padding positions' final states."""
        hidden = self.lm.transformer(input_ids=tokens).last_hidden_state
        real = (tokens > 0).to(hidden.dtype).unsqueeze(-1)
        return (hidden * real).sum(-2) / real.sum(-2).clamp_min(1)


def causal_lm(input_shape: Sequence[int], num_outputs: int, dim: int = 256, layers: int = 4, heads: int = 4) -> CausalLM:
    """``model.name: datalens.core.hf_models:causal_lm``: a GPT-2 of ``layers`` blocks of width ``dim``
    over the dataset's vocabulary (``num_outputs``) and sequence length (``input_shape``)."""
    return CausalLM(num_outputs, int(input_shape[-1]), dim, layers, heads)


class SequenceClassifier(nn.Module):
    """A BERT architecture (Devlin et al., 2019) as a module from token ids (B, L) (0 pads, at the
    end) to class logits (B, num_labels), the pooled first position classified, as BERT on QNLI.

    Made to compose with ``torch.func``: eager attention, and the padding mask passed as the
    additive (B, 1, 1, L) float mask BERT accepts as it is (built by broadcasting from the token ids:
    no data-dependent shape, so ``vmap`` passes through, where the mask HF builds from a (B, L) one
    breaks it); dropout is off and the inner model stays in eval mode (no random draws under
    ``vmap``); no token types (a separator token marks the sentence)."""

    def __init__(self, vocab_size: int, length: int, num_labels: int, dim: int = 256, layers: int = 4, heads: int = 4):
        super().__init__()
        config = BertConfig(vocab_size=vocab_size, max_position_embeddings=length, hidden_size=dim, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=4 * dim, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, type_vocab_size=1, num_labels=num_labels, pad_token_id=0,
                            attn_implementation="eager")
        self.classifier = BertForSequenceClassification(config).eval()
        self.vocab_size = vocab_size

    def train(self, mode: bool = True) -> "SequenceClassifier":
        super().train(mode)
        self.classifier.eval()
        return self

    @staticmethod
    def _mask(tokens: torch.Tensor) -> torch.Tensor:
        return torch.where((tokens > 0)[:, None, None, :], 0.0, torch.finfo(torch.float32).min)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.classifier(input_ids=tokens, attention_mask=self._mask(tokens)).logits

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """A pair's representation (B, dim): the mean of its non-padding positions' final states."""
        hidden = self.classifier.bert(input_ids=tokens, attention_mask=self._mask(tokens)).last_hidden_state
        real = (tokens > 0).to(hidden.dtype).unsqueeze(-1)
        return (hidden * real).sum(-2) / real.sum(-2).clamp_min(1)


def sequence_classifier(input_shape: Sequence[int], num_outputs: int, vocab_size: int = 30000, dim: int = 256, layers: int = 4,
                        heads: int = 4) -> SequenceClassifier:
    """``model.name: datalens.core.hf_models:sequence_classifier``: a BERT of ``layers`` blocks of
    width ``dim`` over ``vocab_size`` token ids and the dataset's sequence length (``input_shape``),
    with ``num_outputs`` classes."""
    return SequenceClassifier(vocab_size, int(input_shape[-1]), num_outputs, dim, layers, heads)
