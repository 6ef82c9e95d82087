"""Model shapes for the planner: a Llama-style decoder's dimensions, the built-in table of the seed's models, and
:func:`load_arch` (alias, local config.json folder, or hub id via ``transformers.AutoConfig``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.errors import UserError

DECODER_TYPES = ("llama", "mistral", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3", "olmo", "olmo2", "granite")
#: Norms per decoder layer where a family has more than Llama's two (Gemma 2/3 also norm before and after the MLP
#: and after attention), and the families with RMS norms on q and k per head (Qwen 3, Gemma 3).
LAYER_NORMS = {"gemma2": 4, "gemma3_text": 4}
QK_NORM_TYPES = ("qwen3", "gemma3_text")


@dataclass(frozen=True)
class Arch:
    """The shapes of a Llama-style decoder, enough to count weights and activations."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    max_positions: int | None = None
    norms_per_layer: int = 2
    qk_norm: bool = False  # an RMS norm of head_dim weights on queries and on keys in every layer
    sliding_window: int | None = None  # the window of the sliding-window layers, if any
    sliding_layers: int = 0  # how many layers attend within the window (Gemma 3: 5 of every 6)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer in one decoder layer."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_linear_params(self) -> int:
        """Weights (and q/k/v biases, if any) of one layer's linear layers."""
        n = sum(a * b for a, b in self.linear_shapes().values())
        return n + (self.q_dim + 2 * self.kv_dim if self.attention_bias else 0)

    def embedding_params(self) -> int:
        """Input embedding plus an untied output head."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def matmul_params(self) -> int:
        """Weights that run as matmuls: every layer's linear layers and an untied output head (a tied head is the
        embedding, which bf16-mixed keeps fp32)."""
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.num_layers * self.layer_linear_params() + head

    def flop_weights(self) -> int:
        """Weights every token multiplies: every layer's linear layers and the LM head, tied or not (PaLM's N)."""
        per_layer = sum(a * b for a, b in self.linear_shapes().values())
        return self.num_layers * per_layer + self.vocab_size * self.hidden_size

    def attention_flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token of the attention scores and their use over a full T x T matrix: 12 L T d_attn
        (PaLM, appendix B)."""
        return 12 * self.num_layers * seq_len * self.q_dim

    def norm_params(self) -> int:
        """The layers' norms (two in Llama, four in Gemma 2/3; q/k norms where the family has them) and the final
        norm."""
        qk = 2 * self.head_dim if self.qk_norm else 0
        return (self.norms_per_layer * self.num_layers + 1) * self.hidden_size + self.num_layers * qk

    def total_params(self) -> int:
        return self.num_layers * self.layer_linear_params() + self.embedding_params() + self.norm_params()


# Architecture numbers of the seed's models (from their published config.json files).
BUILTIN_ARCHS: dict[str, Arch] = {a.name: a for a in [
    Arch("Llama-2-7B", 32000, 4096, 11008, 32, 32, 32, 128, False, max_positions=4096),
    Arch("Mistral-7B-v0.1", 32000, 4096, 14336, 32, 32, 8, 128, False, max_positions=32768),
    Arch("Gemma-7B", 256000, 3072, 24576, 28, 16, 16, 256, True, max_positions=8192),
    Arch("Gemma-2B", 256000, 2048, 16384, 18, 8, 1, 256, True, max_positions=8192),
    Arch("Llama-3-8B", 128256, 4096, 14336, 32, 32, 8, 128, False, max_positions=8192),
    Arch("Gemma-3-270M", 262144, 640, 2048, 18, 4, 1, 256, True, max_positions=32768, norms_per_layer=4,
         qk_norm=True, sliding_window=512, sliding_layers=15),
]}
BUILTIN_HUB_IDS = {"meta-llama/llama-2-7b-hf": "Llama-2-7B", "meta-llama/llama-2-7b": "Llama-2-7B",
                   "mistralai/mistral-7b-v0.1": "Mistral-7B-v0.1", "google/gemma-7b": "Gemma-7B",
                   "google/gemma-2b": "Gemma-2B", "meta-llama/meta-llama-3-8b": "Llama-3-8B",
                   "meta-llama/llama-3-8b": "Llama-3-8B", "google/gemma-3-270m": "Gemma-3-270M"}


def builtin_arch(name: str) -> Arch | None:
    """A seed model from the built-in table, by short name or hub id (case-insensitive)."""
    key = name.strip().lower()
    for short, arch in BUILTIN_ARCHS.items():
        if key == short.lower():
            return arch
    short = BUILTIN_HUB_IDS.get(key)
    return BUILTIN_ARCHS[short] if short else None


def arch_from_config(config: Any, name: str) -> Arch:
    """An :class:`Arch` from a transformers config (or a plain dict of config.json)."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    text = get("text_config")
    if text is not None and get("hidden_size") is None:
        return arch_from_config(text, name)
    model_type = get("model_type") or "?"
    needed = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in needed if get(k) is None]
    if missing or model_type not in DECODER_TYPES:
        raise UserError(f"model {name!r} ({model_type}) is not a Llama-style decoder the planner knows "
                        f"(supported: {', '.join(DECODER_TYPES)}); "
                        "plan a decoder such as " + ", ".join(BUILTIN_ARCHS))
    heads = int(get("num_attention_heads"))
    hidden = int(get("hidden_size"))
    return Arch(name=name, vocab_size=int(get("vocab_size")), hidden_size=hidden,
                intermediate_size=int(get("intermediate_size")), num_layers=int(get("num_hidden_layers")),
                num_heads=heads, num_kv_heads=int(get("num_key_value_heads") or heads),
                head_dim=int(get("head_dim") or hidden // heads),
                tie_word_embeddings=bool(get("tie_word_embeddings", True)),
                attention_bias=bool(get("attention_bias", model_type in ("qwen2",))),
                max_positions=get("max_position_embeddings"),
                norms_per_layer=LAYER_NORMS.get(model_type, 2), qk_norm=model_type in QK_NORM_TYPES,
                **sliding_layout(get))


def sliding_layout(get) -> dict[str, Any]:
    """The sliding-window layers a config declares (``layer_types``, or Mistral's window on every layer)."""
    window = get("sliding_window")
    if not window:
        return {}
    types = get("layer_types")
    layers = sum(t == "sliding_attention" for t in types) if types else int(get("num_hidden_layers"))
    return {"sliding_window": int(window), "sliding_layers": layers}


def load_arch(name: str) -> Arch:
    """Shapes for a model name: built-in table, alias, local folder with config.json, or hub id."""
    from peftlab.models import ALIASES, resolve_model_source

    arch = builtin_arch(name)
    if arch is not None:
        return arch
    path = Path(name).expanduser()
    if path.is_file() and path.name.endswith(".json"):
        return arch_from_config(json.loads(path.read_text(encoding="utf-8")), name)
    if name in ALIASES or path.exists():
        source = Path(resolve_model_source(name))
        return arch_from_config(json.loads((source / "config.json").read_text(encoding="utf-8")), name)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"model {name!r}: no such folder or config.json, and not in the built-in table "
                        f"({', '.join(BUILTIN_ARCHS)}); give a folder with config.json, an alias "
                        f"({', '.join(ALIASES)}) or a hub id")
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise UserError(f"model {name!r}: its config could not be fetched ({str(exc).splitlines()[0]}); it is not "
                        f"in the built-in table ({', '.join(BUILTIN_ARCHS)}); with network access set "
                        "HF_HUB_OFFLINE=0, or give a local folder with config.json") from None
    return arch_from_config(config, name)


