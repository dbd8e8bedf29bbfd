"""Tiny seeded CPU models (fp32, a few thousand parameters at most), one per kind of module a method wraps.

``TINY_MODELS[name]()`` returns ``(model, example_input)``. Each factory is deterministic (its own seed,
without disturbing the global RNG) so two calls give bit-identical models: tests can build a fresh copy
of "the same base" at any time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "TINY_MODELS",
    "TaggedLinear",
    "TinyBert",
    "TinyBlock",
    "TinyCNN",
    "TinyEmbedLM",
    "TinyLlama",
    "TinyMLP",
    "TinyTagged",
    "TinyTiedLlama",
    "make",
    "make_tied_llama",
]


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # fork_rng restores the global generator afterwards, so building a model never shifts other tests' RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class TinyMLP(nn.Module):
    """Linear → LayerNorm → ReLU → Linear (no bias) → Linear head. ``x (N, 6) -> (N, 3)``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.norm(self.fc1(x))))))


class TinyCNN(nn.Module):
    """Conv (no bias) → BN → ReLU → Conv → BN (no affine) → ReLU → pool → Linear; ``(N, 3, 6, 6) -> (N, 3)``.

    BatchNorm running statistics and affine parameters are randomised so that eval mode is not the
    identity (fresh running stats are mean 0 / var 1, which would hide mistakes).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(5, affine=False)
        self.head = nn.Linear(5, 3)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                assert bn.running_mean is not None and bn.running_var is not None
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
            self.bn1.weight.uniform_(0.5, 1.5)
            self.bn1.bias.uniform_(-0.5, 0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class TinyBlock(nn.Module):
    """A pre-norm transformer block with ``nn.MultiheadAttention``. ``x (N, T, 8) -> (N, T, 8)``.

    ``nn.MultiheadAttention`` never calls ``out_proj.forward``: it reads ``out_proj.weight`` and
    ``out_proj.bias`` directly, which is what makes this model a useful test of wrappers.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.ln2 = nn.LayerNorm(8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        with torch.no_grad():  # MHA zero-initialises its biases; random ones exercise the bias path
            assert self.attn.in_proj_bias is not None
            self.attn.in_proj_bias.uniform_(-0.2, 0.2)
            self.attn.out_proj.bias.uniform_(-0.2, 0.2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TaggedLinear(nn.Linear):
    """A user-defined ``nn.Linear`` subclass with an extra attribute and its own forward."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, tag: str = "") -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.tag = tag

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class TinyTagged(nn.Module):
    """Two ``TaggedLinear`` layers around a ReLU. ``x (N, 5) -> (N, 4)``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = TaggedLinear(5, 7, tag="in")
        self.out = TaggedLinear(7, 4, bias=False, tag="out")

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.relu(self.inp(x)))


class TinyEmbedLM(nn.Module):
    """Embedding → Linear → ReLU → ``lm_head`` (a Linear to the vocabulary). ``ids (N, T) -> (N, T, 12)``.

    ``get_output_embeddings`` returns ``lm_head``, as in transformers, so ``"all-linear"`` must skip it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 6)
        self.proj = nn.Linear(6, 6)
        self.lm_head = nn.Linear(6, 12, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, ids: Tensor) -> Tensor:
        return self.lm_head(F.relu(self.proj(self.embed(ids))))


class TinyBert(nn.Module):
    """A 2-layer transformers ``BertModel`` (hidden 16, 2 heads, vocab 50). ``ids (N, T) -> (N, T, 16)``.

    ``model(ids)`` returns ``last_hidden_state`` so the suite can compare tensors. The wrapper does not
    define ``get_input_embeddings``: the inner ``hf`` model does, and it receives ``input_ids`` by keyword,
    which is what input-space methods (prompt tuning) hook. Dropout is off and attention is "eager" so
    train and eval forwards are deterministic.
    """

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,  # room for the default 20 virtual tokens of prompt tuning
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            attn_implementation="eager",
        )
        self.hf = BertModel(config, add_pooling_layer=False)

    def forward(self, ids: Tensor) -> Tensor:
        return self.hf(input_ids=ids).last_hidden_state


class TinyLlama(nn.Module):
    """A 2-layer transformers ``LlamaForCausalLM`` (hidden 16, 2 heads, 1 KV head, vocab 50, untied head).

    ``ids (N, T) -> logits (N, T, 50)``; the inner ``hf`` model owns ``get_input_embeddings``.
    """

    def __init__(self) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,  # grouped-query attention, as in SmolLM2
            intermediate_size=32,
            max_position_embeddings=64,
            tie_word_embeddings=False,  # a tied head would make two wrappers write one tensor on fold
            attn_implementation="eager",
        )
        self.hf = LlamaForCausalLM(config)

    def forward(self, ids: Tensor) -> Tensor:
        return self.hf(input_ids=ids).logits


class TinyTiedLlama(nn.Module):
    """:class:`TinyLlama` with ``tie_word_embeddings=True``: ``hf.lm_head.weight`` *is*
    ``hf.model.embed_tokens.weight`` (one ``nn.Parameter``), as in SmolLM2. ``ids (N, T) -> (N, T, 50)``.
    """

    def __init__(self) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=32,
            max_position_embeddings=64,
            tie_word_embeddings=True,
            attn_implementation="eager",
        )
        self.hf = LlamaForCausalLM(config)
        assert self.hf.lm_head.weight is self.hf.model.embed_tokens.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.hf(input_ids=ids).logits


def make_tied_llama() -> tuple[TinyTiedLlama, Tensor]:
    """A seeded :class:`TinyTiedLlama` in eval mode and an input ``(2, 5)`` (not in ``TINY_MODELS``: the
    conformance matrix would have to untie it; ``tests/core/test_tied_weights.py`` covers it)."""
    with _seeded(8):
        model = TinyTiedLlama()
        return model.eval(), torch.randint(0, 50, (2, 5))


def _mlp() -> tuple[nn.Module, Tensor]:
    with _seeded(1):
        return TinyMLP(), torch.randn(4, 6)


def _cnn() -> tuple[nn.Module, Tensor]:
    with _seeded(2):
        return TinyCNN(), torch.randn(2, 3, 6, 6)


def _block() -> tuple[nn.Module, Tensor]:
    with _seeded(3):
        return TinyBlock(), torch.randn(2, 5, 8)


def _tagged() -> tuple[nn.Module, Tensor]:
    with _seeded(4):
        return TinyTagged(), torch.randn(3, 5)


def _embed() -> tuple[nn.Module, Tensor]:
    with _seeded(5):
        return TinyEmbedLM(), torch.randint(0, 12, (2, 5))


def _bert() -> tuple[nn.Module, Tensor]:
    with _seeded(6):
        return TinyBert(), torch.randint(0, 50, (2, 5))


def _llama() -> tuple[nn.Module, Tensor]:
    with _seeded(7):
        return TinyLlama(), torch.randint(0, 50, (2, 5))


TINY_MODELS: dict[str, Callable[[], tuple[nn.Module, Tensor]]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "mha_block": _block,
    "tagged_linear": _tagged,
    "embedding": _embed,
    "tiny_bert": _bert,
    "tiny_llama": _llama,
}


def make(name: str) -> tuple[nn.Module, Tensor]:
    """``(model, example_input)`` of the tiny model ``name``, in eval mode."""
    model, x = TINY_MODELS[name]()
    return model.eval(), x
