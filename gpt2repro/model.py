"""The GPT-2 model: config and presets, the network, generation; from_pretrained/save_pretrained (gpt2repro/hf.py).

Readable in one sitting, like nanoGPT's model.py. Parameter names follow GPT-2's
(transformer.wte, transformer.h.N.attn.c_attn, ...) so that importing OpenAI's
weights is a direct name map plus a transpose (HF stores them as Conv1D, (in, out)).
This module does no distributed work and no I/O.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from gpt2repro import hf
from gpt2repro.devices import fused_loss_pays
from gpt2repro.loss import linear_cross_entropy
from gpt2repro.schema import Settings, setting

# The output projection is the token embedding (weight tying): in a state dict, the same tensor twice.
TIED_WEIGHTS = {"lm_head.weight": "transformer.wte.weight"}


def without_tied(state: dict) -> dict:
    """A state dict with each tied weight once (what a checkpoint stores)."""
    return {k: v for k, v in state.items() if k not in TIED_WEIGHTS}


def with_tied(state: dict) -> dict:
    """without_tied's inverse: the aliases load_state_dict expects, pointing at the same tensors."""
    return state | {alias: state[name] for alias, name in TIED_WEIGHTS.items()}


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = dataclasses.field(default=0.0, metadata={"weights": False})  # training only, no weights
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2
    # Round the embedding/lm_head rows up to a multiple of this (64 gives 50304 for
    # GPT-2's 50257), which makes the lm_head matmul faster on GPUs. The extra rows
    # are never part of the loss and never sampled.
    pad_vocab_multiple: int = 1

    def __post_init__(self) -> None:
        if problems := shape_problems(self):
            raise ValueError("Invalid GPTConfig: " + "; ".join(problems) + ".")

    @staticmethod
    def weight_fields() -> tuple[str, ...]:
        """The fields that decide the weights' shapes: a checkpoint loads only into the same ones."""
        return tuple(f.name for f in dataclasses.fields(GPTConfig) if f.metadata.get("weights", True))

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        if name not in PRESETS:
            raise ValueError(f"Unknown model preset {name!r}; valid presets are: {', '.join(PRESETS)}.")
        return dataclasses.replace(PRESETS[name], **overrides)


def shape_problems(config) -> list[str]:
    """What is wrong with a model shape (GPTConfig's fields, read from any object that has them: the
    training config validates through here too), one sentence each."""
    problems = [
        f"{name} must be at least 1, got {getattr(config, name)}"
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "pad_vocab_multiple")
        if getattr(config, name, 1) < 1
    ]
    if config.n_head >= 1 and config.n_embd % config.n_head != 0:
        problems.append(
            f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head}); "
            "choose n_head among the divisors of n_embd"
        )
    if not 0.0 <= config.dropout < 1.0:
        problems.append(f"dropout must be in [0, 1), got {config.dropout}")
    return problems


_GPT2 = GPTConfig()


@dataclass(frozen=True)
class ModelSettings(Settings):
    """The network a run trains (GPTConfig's fields, with its defaults: GPT-2 124M), and the seed of its weights."""

    TITLE = "model"

    n_layer: int = setting(_GPT2.n_layer, "transformer blocks")
    n_head: int = setting(_GPT2.n_head, "attention heads per block (they divide n_embd)")
    n_embd: int = setting(_GPT2.n_embd, "width of the residual stream")
    block_size: int = setting(_GPT2.block_size, "context length in tokens")
    vocab_size: int = setting(_GPT2.vocab_size, "token embedding rows (GPT-2's BPE: 50257; at most 65536)")
    dropout: float = setting(_GPT2.dropout, "dropout probability in training (GPT-2 pretraining: 0)")
    bias: bool = setting(_GPT2.bias, "biases in Linear and LayerNorm, as GPT-2")
    seed: int = setting(1337, "the weights' initialisation, dropout and the data's shuffle", at_least=0)

    def problems(self) -> list[str]:
        problems = shape_problems(self)
        if self.vocab_size > 65536:
            problems.append(f"vocab_size {self.vocab_size} does not fit the uint16 token shards (at most 65536)")
        return problems

    def model_config(self) -> GPTConfig:
        """The network. 64-row padding of the vocabulary: faster lm_head matmuls, never part of the loss."""
        return GPTConfig(**{f: getattr(self, f) for f in MODEL_FIELDS}, dropout=self.dropout, pad_vocab_multiple=64)


# The fields that define the network (and must match a checkpoint to load it).
MODEL_FIELDS = tuple(f for f in GPTConfig.weight_fields() if f in {f.name for f in dataclasses.fields(ModelSettings)})


PRESETS: dict[str, GPTConfig] = {
    "gpt2-124m": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-350m": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-774m": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-1558m": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
    # Small ones for CPU demos and tests (GPT-2 vocabulary, short context).
    "gpt-mini": GPTConfig(n_layer=6, n_head=6, n_embd=192, block_size=256),
    "gpt-micro": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128),
    "gpt-nano": GPTConfig(n_layer=3, n_head=3, n_embd=48, block_size=64),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        """cache: this layer's [k, v] from earlier positions (generation only), extended in place."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        has_past = cache is not None and len(cache) == 2
        if cache is not None:
            if has_past:
                k, v = torch.cat((cache[0], k), dim=2), torch.cat((cache[1], v), dim=2)
            cache[:] = [k, v]
        # Flash / memory-efficient kernels where available; scale is 1/sqrt(hs) as GPT-2.
        # A single new token after cached positions attends to all of them: no mask needed.
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=not has_past)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 uses the tanh approximation of GELU ("gelu_new" in transformers).
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block, as GPT-2."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        for name, module in self.named_modules():  # the order of module.apply for these leaves
            self._init_weights(module, name)
        # Training-time memory/compute trade: keep only each block's input and recompute its
        # activations during backward (about a third more compute, a fraction of the memory).
        self.activation_checkpointing = False
        # Training's loss (return_logits=False) without the full logits (gpt2repro/loss.py): True, False, or
        # None for where it pays on the device the forward runs on (training sets it from its settled config).
        self.fused_loss: bool | None = None

    def _init_weights(self, module: nn.Module, name: str) -> None:
        # GPT-2 init: N(0, 0.02), with residual projections (attn.c_proj, mlp.c_proj) scaled by
        # 1/sqrt(2 * n_layer) because each block adds two of them to the residual stream. Decided
        # by name, not by a module attribute, so that a converted layer (fp8's Float8Linear, built
        # afresh) and the meta-device replay (gpt2repro/parallel.py) get the same init.
        if isinstance(module, nn.Linear):
            std = 0.02
            if name.endswith("c_proj"):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); non_embedding drops wpe and wte."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel() + self.transformer.wte.weight.numel()
        return n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: list | None = None,
        return_logits: bool = True,
    ):
        """idx (B, T) token ids -> (logits (B, T, vocab_size), mean cross-entropy or None).

        Targets equal to -1 are ignored by the loss. kv_cache (generation): a list with one
        [k, v] entry per layer, [] when empty; idx then holds the positions after those
        cached (all of them to fill an empty cache, one token afterwards).
        return_logits=False (training): (None, loss); with fused_loss the full (B, T, vocab)
        logits never exist, only one chunk of tokens at a time (gpt2repro/loss.py).
        """
        past = kv_cache[0][0].size(2) if kv_cache and kv_cache[0] else 0
        self._check_input(idx, past)
        B, T = idx.shape
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        if kv_cache is not None and not kv_cache:
            kv_cache.extend([] for _ in self.transformer.h)
        for i, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and torch.is_grad_enabled() and kv_cache is None:
                # Non-reentrant: replays dropout with the same RNG state, works with FSDP and compile.
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, kv_cache[i] if kv_cache is not None else None)
        x = self.transformer.ln_f(x)
        V = self.config.vocab_size
        fused = self.fused_loss if self.fused_loss is not None else fused_loss_pays(idx.device.type)
        if targets is not None and not return_logits and fused:
            return None, linear_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1), V)
        logits = self.lm_head(x)  # (B, T, padded V)
        if logits.size(-1) > V:
            # Padded vocabulary rows exist for matmul speed only. -inf logits never enter the
            # softmax (exp(-inf) = 0) nor sampling; filling those few columns in place is far
            # cheaper than copying the whole (B, T, V) slice.
            logits[..., V:] = float("-inf")
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1).float(), targets.reshape(-1), ignore_index=-1)
        return (logits[..., :V] if return_logits else None), loss  # a view: no copy

    def _check_input(self, idx: torch.Tensor, past: int = 0) -> None:
        if idx.dim() != 2:
            raise ValueError(f"Expected token ids of shape (batch, time), got shape {tuple(idx.shape)}.")
        if past and idx.size(1) != 1:
            raise ValueError("With a filled kv_cache, pass one new token per step.")
        if past + idx.size(1) > self.config.block_size:
            raise ValueError(
                f"Sequence length {past + idx.size(1)} exceeds the model's block_size {self.config.block_size}; "
                "crop the input to the last block_size tokens."
            )
        # Checking ids on an accelerator would force a host sync every step; there the
        # data loader validates token ids once, up front.
        if idx.device.type == "cpu" and idx.numel() and (idx.min() < 0 or idx.max() >= self.config.vocab_size):
            raise ValueError(
                f"Token ids must lie in [0, {self.config.vocab_size}), got range "
                f"[{int(idx.min())}, {int(idx.max())}]; check the tokenizer against the model's vocab_size."
            )

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: decay matmul weights and embeddings, not biases and norms."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]

    def configure_optimizers(self, train_config) -> torch.optim.AdamW:
        """minGPT's hook: AdamW from a config with weight_decay, learning_rate, betas."""
        return torch.optim.AdamW(
            self.optim_groups(train_config.weight_decay), lr=train_config.learning_rate, betas=train_config.betas
        )

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12·L·T·C.

        N counts the matmul parameters, lm_head (tied with wte) included, wpe excluded.
        """
        cfg = self.config
        T = seq_len or cfg.block_size
        n_matmul = self.num_params() - self.transformer.wpe.weight.numel()
        return 6 * n_matmul + 12 * cfg.n_layer * T * cfg.n_embd

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        do_sample: bool = True,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens, feeding back each prediction.

        The context is cropped to the last block_size tokens. do_sample=False is greedy.
        With use_cache, keys and values of earlier positions are kept, so each new token
        costs one position; once the context slides past block_size the positions shift,
        and the cache is refilled from the cropped context each step (as without it).
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}; use do_sample=False for greedy.")
        block = self.config.block_size
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(idx[:, -block:])
            elif cache is None or idx.size(1) > block:
                cache = []
                logits, _ = self(idx[:, -block:], kv_cache=cache)
            else:
                logits, _ = self(idx[:, -1:], kv_cache=cache)
            logits = logits[:, -1, :] / temperature  # (B, V)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            if do_sample:
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
            else:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    # ----- Hugging Face interop (the files: gpt2repro/hf.py) ---------------------------------
    @classmethod
    def from_pretrained(cls, name_or_dir: str | os.PathLike, **overrides) -> GPT:
        """Load GPT-2 weights from a local save_pretrained directory or a hub name ("gpt2", ...)."""
        path = hf.locate(name_or_dir)
        model = cls(GPTConfig(**hf.read_shape(path), **overrides))
        with torch.no_grad():
            hf.copy_into(model.state_dict(), hf.read_weights(path), source=path)
        return model

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Write config.json + model.safetensors that transformers.GPT2LMHeadModel loads."""
        cfg = self.config
        if not cfg.bias:
            raise ValueError("Hugging Face GPT-2 has biases; a model with bias=False cannot be exported to it.")
        shape = {f: getattr(cfg, f) for f in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout")}
        hf.write(out_dir, hf.from_ours(self.state_dict(), cfg.vocab_size), shape)
