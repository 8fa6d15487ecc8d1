"""Settings as dataclasses, checked in __post_init__.

ModelConfig mirrors the fields of a Hugging Face Llama config.json that change the computation;
`from_hf` validates a config.json dict and names the file and field that is wrong.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the source and the field."""


@dataclass
class RopeScaling:
    """The `llama3` rope_scaling block (Llama 3.1+): low frequencies are divided by `factor`,
    high ones kept, the band between interpolated smoothly."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings")

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")

    @property
    def n_rep(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        arch = d.get("model_type")
        if arch is not None and arch != "llama":
            raise ConfigError(f"{source}: model_type is {arch!r}; only 'llama' is supported")
        for name in cls.REQUIRED:
            if name not in d:
                raise ConfigError(f"{source}: missing field {name!r}")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        kw = {k: v for k, v in d.items() if k in known}
        kw.setdefault("num_key_value_heads", d["num_attention_heads"])
        rs = d.get("rope_scaling")
        if rs is not None:
            kind = rs.get("rope_type", rs.get("type"))
            if kind in ("default", None):
                kw["rope_scaling"] = None
            elif kind != "llama3":
                raise ConfigError(f"{source}: rope_scaling type {kind!r} is not supported (only 'llama3')")
            else:
                try:
                    kw["rope_scaling"] = RopeScaling(
                        factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
                        high_freq_factor=float(rs["high_freq_factor"]),
                        original_max_position_embeddings=int(rs["original_max_position_embeddings"]))
                except KeyError as e:
                    raise ConfigError(f"{source}: rope_scaling is missing field {e}") from None
        kw["extra"] = {k: v for k, v in d.items() if k not in known}
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        d = {**self.extra, **d}
        if self.rope_scaling is not None:
            d["rope_scaling"] = asdict(self.rope_scaling)
        d["architectures"] = ["LlamaForCausalLM"]
        d["model_type"] = "llama"
        return d
