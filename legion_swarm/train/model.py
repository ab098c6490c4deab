"""The models a swarm trains: TinyGPT presets, or any Hugging Face causal LM built from scratch.

**The contract.** The rest of the system (modes, optimizers, state sync, evaluation) needs only a
``torch.nn.Module`` whose ``forward(idx, targets=None)`` takes ``idx``, int64 token ids of shape [B, T], and
returns ``(logits, loss)``: ``logits`` of shape [B, T, V] and ``loss`` the mean cross-entropy of ``logits``
against ``targets`` (int64 [B, T], already shifted: ``targets[:, t]`` is the token after ``idx[:, t]``), or
``None`` without targets. Its trainable parameters must be float32 and, for swarm training, identical on every
member after construction from the same config: every model here initialises from a generator seeded with
``ModelConfig.seed``, independent of (and without disturbing) the global torch RNG.

**TinyGPT** is GPT-2 in miniature: learned position embeddings, pre-LayerNorm blocks of causal self-attention
(:func:`torch.nn.functional.scaled_dot_product_attention`, which picks a fused kernel where one exists) and a
4x GELU MLP, a final LayerNorm and an output head tied to the token embedding. Initialisation follows GPT-2:
normal(0, 0.02) weights, zero biases, and the projections that write into the residual stream scaled by
1/sqrt(2 n_layer) so the stream's variance does not grow with depth.

**Hugging Face** architectures (``ModelConfig(preset="hf:gpt2")``, ``hf:llama``, ...) are built with random
weights from ``AutoConfig.for_model`` and ``AutoModelForCausalLM.from_config`` (nothing is downloaded) and
wrapped by :class:`HFCausalLM` to fit the contract. ``transformers`` is optional and imported only then.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from legion_swarm.config import HF_PREFIX, ModelConfig
from legion_swarm.errors import ModelError

logger = logging.getLogger(__name__)

INIT_STD = 0.02
"""Standard deviation of GPT-2's initial weights."""
_RESIDUAL_PROJECTIONS = ("attn.proj", "mlp.proj")
"""Module-name suffixes of the linear layers that add into the residual stream."""


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention over [B, T, d_model]."""

    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # [B, T, 3C] -> three [B, n_head, T, head_dim]
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    """Position-wise feed-forward: d_model -> 4 d_model -> GELU -> d_model."""

    def __init__(self, d_model: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A small GPT with the ``forward(idx, targets) -> (logits, loss)`` contract; deterministic initial weights.

    Built on CPU; move it with ``.to(device)``. The output head reuses the token embedding matrix, so the
    parameter count includes it once.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.is_hf:
            raise ModelError(f"TinyGPT cannot build preset {config.preset!r}: use build_model()")
        assert config.n_layer and config.n_head and config.d_model and config.seq_len  # resolved by ModelConfig
        self.config = config
        d = config.d_model
        # The modules' default initialisation draws from the global RNG: it runs on a forked RNG so the caller's
        # stream is untouched, and reset_parameters() overwrites it from our own generator. (Building on the meta
        # device would skip that work but import torch's symbolic-shape machinery: seconds of start-up.)
        with torch.random.fork_rng(devices=[]):
            self.wte = nn.Embedding(config.vocab_size, d)
            self.wpe = nn.Embedding(config.seq_len, d)
            self.drop = nn.Dropout(config.dropout)
            self.blocks = nn.ModuleList(Block(d, config.n_head, config.dropout) for _ in range(config.n_layer))
            self.ln_f = nn.LayerNorm(d)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set every parameter to its GPT-2 initial value for ``config.seed`` (bit-identical on any machine)."""
        gen = torch.Generator(device="cpu").manual_seed(self.config.seed)
        residual_std = INIT_STD / math.sqrt(2 * self.config.n_layer)  # type: ignore[operator]
        done: set[int] = set()
        with torch.no_grad():
            # named_modules() follows registration order, so the draws happen in the same order everywhere.
            for name, module in self.named_modules():
                if isinstance(module, nn.Linear):
                    std = residual_std if name.endswith(_RESIDUAL_PROJECTIONS) else INIT_STD
                    nn.init.normal_(module.weight, 0.0, std, generator=gen)
                    if module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, nn.Embedding):
                    nn.init.normal_(module.weight, 0.0, INIT_STD, generator=gen)
                elif isinstance(module, nn.LayerNorm):
                    module.weight.fill_(1.0)
                    module.bias.zero_()
                else:
                    continue
                done.update(id(p) for p in module.parameters(recurse=False))
        missed = [n for n, p in self.named_parameters() if id(p) not in done]
        if missed:  # a new layer type would otherwise keep the uninitialised memory of to_empty()
            raise ModelError(f"TinyGPT.reset_parameters does not initialise {', '.join(missed)}")

    def num_params(self) -> int:
        """Trainable parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``idx``: int64 [B, T] with T <= seq_len. Returns logits [B, T, vocab_size] and the mean cross-entropy
        against ``targets`` (int64 [B, T]), or None without targets."""
        T = idx.shape[1]
        if T > self.wpe.num_embeddings:
            raise ValueError(f"sequence of {T} tokens exceeds the model's seq_len {self.wpe.num_embeddings}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied head: [B, T, d] @ [d, V]
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class HFCausalLM(nn.Module):
    """Adapts a Hugging Face ``*ForCausalLM`` to the ``forward(idx, targets) -> (logits, loss)`` contract."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Our targets are already shifted, so the loss is computed here: passing labels= would shift again.
        logits = self.model(input_ids=idx).logits
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def build_model(config: ModelConfig) -> nn.Module:
    """The model ``config`` describes, on CPU, with the same initial parameters in every process."""
    model = _build_hf(config) if config.is_hf else TinyGPT(config)
    logger.info(
        "built %s: %d layers, d_model %d, %d heads, seq_len %d, %.2f M parameters", config.preset, config.n_layer,
        config.d_model, config.n_head, config.seq_len, sum(p.numel() for p in model.parameters()) / 1e6,
    )  # fmt: skip
    return model


def _build_hf(config: ModelConfig) -> HFCausalLM:
    model_type = config.preset[len(HF_PREFIX) :]
    try:
        import transformers  # optional and slow to import: only for hf: presets
    except ImportError:
        raise ModelError(
            f"model preset {config.preset!r} needs the transformers package: pip install transformers "
            "(or use a built-in preset: tiny, small, medium)"
        ) from None
    d = config.d_model
    assert d is not None
    # The generic names; each config class maps them onto its own (GPT-2: n_embd, n_layer, n_head, n_positions)
    # through its attribute_map. Dropout names differ per architecture; unused ones are ignored.
    sizes = {
        "vocab_size": config.vocab_size, "hidden_size": d, "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head, "max_position_embeddings": config.seq_len, "intermediate_size": 4 * d,
    }  # fmt: skip
    dropouts = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout", "dropout")
    try:
        hf_config = transformers.AutoConfig.for_model(
            model_type, **sizes, **dict.fromkeys(dropouts, config.dropout), tie_word_embeddings=True
        )
    except (ValueError, KeyError) as e:
        raise ModelError(f"unknown Hugging Face model type {model_type!r}: {e}") from None
    # from_config initialises from the global RNG: seed a private copy of it and restore it afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        try:
            model = transformers.AutoModelForCausalLM.from_config(hf_config)
        except (ValueError, KeyError) as e:
            raise ModelError(f"{model_type!r} has no causal-LM head in transformers: {e}") from None
    return HFCausalLM(model.float())
