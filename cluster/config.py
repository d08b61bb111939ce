"""Model configuration parsed from an HF `config.json` (Mixtral and Mistral keys)."""

from __future__ import annotations

import json
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import Any

TOKENIZER_VERSIONS = ("v1", "v2", "v3")
# Weight quantizations a checkpoint may declare (config.json's `quantization_config.quant_method`) or `--quantization`
# may ask for: fp8 = float8_e4m3fn weights with float32 scales (`cluster.kernels.fp8`).
QUANTIZATIONS = ("fp8",)
# Key under which this project records its own facts in config.json (transformers ignores unknown keys).
PROJECT_KEY = "moe_cluster"


class ConfigError(ValueError):
    """A config.json that cannot describe a model this project runs; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    num_experts: int  # 0 = dense (Mistral)
    experts_per_token: int
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    tokenizer_version: str | None = None  # None: inferred from the vocabulary size
    quantization: str | None = None  # how the checkpoint stores its weights: None (as the dtype says) or "fp8"

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of every layer for one token: what the engine's cache and the planner both count."""
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    def __post_init__(self) -> None:
        _validate(self)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json a checkpoint of this shape carries (loadable by transformers)."""
        d: dict[str, Any] = {
            "architectures": ["MixtralForCausalLM" if self.is_moe else "MistralForCausalLM"],
            "model_type": "mixtral" if self.is_moe else "mistral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "sliding_window": None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "attention_dropout": 0.0,
        }
        if self.is_moe:
            d["num_local_experts"] = self.num_experts
            d["num_experts_per_tok"] = self.experts_per_token
            d["router_jitter_noise"] = 0.0
        if self.tokenizer_version:
            d[PROJECT_KEY] = {"tokenizer": self.tokenizer_version}
        if self.quantization:
            # What vLLM's fp8 checkpoints declare; "dynamic": no input_scale tensors (activations are scaled per token).
            d["quantization_config"] = {"quant_method": self.quantization, "activation_scheme": "dynamic"}
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Parse Mixtral/Mistral config keys; raises ConfigError naming the missing or bad field."""
        _check_supported(d)
        hidden = _int(d, "hidden_size")
        heads = _int(d, "num_attention_heads")
        head_dim = d.get("head_dim")
        if head_dim is None:
            if heads <= 0 or hidden % heads:
                raise ConfigError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
            head_dim = hidden // heads
        num_experts = d.get("num_local_experts") or 0
        project = d.get(PROJECT_KEY) or {}
        return cls(
            vocab_size=_int(d, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int(d, "intermediate_size"),
            num_layers=_int(d, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=_int(d, "num_key_value_heads", default=heads),
            head_dim=_as_int("head_dim", head_dim),
            max_position_embeddings=_int(d, "max_position_embeddings"),
            rope_theta=_rope_theta(d),
            rms_norm_eps=_float(d, "rms_norm_eps", default=1e-5),
            num_experts=_as_int("num_local_experts", num_experts),
            experts_per_token=_int(d, "num_experts_per_tok", default=2) if num_experts else 0,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=_int(d, "bos_token_id", default=1),
            eos_token_id=_eos(d),
            tokenizer_version=project.get("tokenizer"),
            quantization=_quantization(d),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(d, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_hf_dict(d)

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def expert_quantization(config: ModelConfig, asked: str | None) -> str | None:
    """What the experts are held in: `asked` (`--quantization`; a bf16 or fp32 checkpoint is quantized as it loads),
    else the checkpoint's own (an fp8 checkpoint stays fp8). Only experts are quantized: asking it of a dense model
    is a ValueError. (The non-expert tensors of an fp8 checkpoint are dequantized into the model's dtype at load.)"""
    if asked is not None and asked not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {asked!r}: choose one of {', '.join(QUANTIZATIONS)}")
    if not config.is_moe:
        if asked is not None:
            raise ValueError(f"quantization {asked} applies to the experts, and this model is dense")
        return None
    return asked or config.quantization


def _check_supported(d: dict[str, Any]) -> None:
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported (Mixtral and Mistral use 'silu')")
    window = d.get("sliding_window")
    if window is not None and window < d.get("max_position_embeddings", 0):
        raise ConfigError(f"sliding_window {window} is not supported (set it to null)")
    if d.get("router_jitter_noise"):
        raise ConfigError("router_jitter_noise must be 0 for inference")


def _validate(c: ModelConfig) -> None:
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "max_position_embeddings"):
        if getattr(c, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(c, name)}")
    if c.num_heads % c.num_kv_heads:
        raise ConfigError(f"num_attention_heads {c.num_heads} is not a multiple of num_key_value_heads {c.num_kv_heads}")
    if c.head_dim % 2:
        raise ConfigError(f"head_dim {c.head_dim} must be even for rotary embeddings")
    if c.num_experts < 0:
        raise ConfigError(f"num_local_experts must be >= 0, got {c.num_experts}")
    if c.is_moe and not 1 <= c.experts_per_token <= c.num_experts:
        raise ConfigError(f"num_experts_per_tok {c.experts_per_token} must be in 1..num_local_experts {c.num_experts}")
    if c.rope_theta <= 0:
        raise ConfigError(f"rope_theta must be positive, got {c.rope_theta}")
    if c.quantization is not None and c.quantization not in QUANTIZATIONS:
        raise ConfigError(f"quantization {c.quantization!r} is not one of {QUANTIZATIONS}")
    if c.tokenizer_version is not None and c.tokenizer_version not in TOKENIZER_VERSIONS:
        raise ConfigError(f"{PROJECT_KEY}.tokenizer {c.tokenizer_version!r} is not one of {TOKENIZER_VERSIONS}")


def _quantization(d: dict[str, Any]) -> str | None:
    """`quantization_config` as vLLM's fp8 checkpoints write it: quant_method "fp8", activation_scheme "static" or
    "dynamic" (either serves: activations are always scaled per token, so a checkpoint's input_scale is not needed),
    per-tensor or per-channel weight scales. Block-wise scales (`weight_block_size`) and other methods are refused:
    read as plain weights they would be garbage."""
    q = d.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ConfigError("quantization_config must be an object")
    method = q.get("quant_method")
    if method not in QUANTIZATIONS:
        raise ConfigError(f"quantization_config.quant_method {method!r} is not supported (only {QUANTIZATIONS})")
    if q.get("weight_block_size") is not None:
        raise ConfigError(f"quantization_config.weight_block_size {q['weight_block_size']!r} is not supported "
                          "(per-tensor or per-channel weight scales only)")
    scheme = q.get("activation_scheme", "dynamic")
    if scheme not in ("static", "dynamic"):
        raise ConfigError(f"quantization_config.activation_scheme {scheme!r} is not 'static' or 'dynamic'")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"quantization_config.fmt {fmt!r} is not supported (only e4m3)")
    return method


def _rope_theta(d: dict[str, Any]) -> float:
    params = d.get("rope_parameters")  # transformers 5.x
    if params is not None:
        if not isinstance(params, dict):
            raise ConfigError("rope_parameters must be an object")
        rope_type = params.get("rope_type", "default")
        if rope_type != "default":
            raise ConfigError(f"rope_parameters.rope_type {rope_type!r} is not supported (only 'default')")
        if "rope_theta" in params:
            return _as_float("rope_parameters.rope_theta", params["rope_theta"])
    scaling = d.get("rope_scaling")
    if scaling:
        raise ConfigError(f"rope_scaling {scaling!r} is not supported")
    return _float(d, "rope_theta", default=1e6)


def _eos(d: dict[str, Any]) -> int:
    eos = d.get("eos_token_id", 2)
    if isinstance(eos, list):
        if not eos:
            raise ConfigError("eos_token_id must not be an empty list")
        eos = eos[0]
    return _as_int("eos_token_id", eos)


_MISSING = object()


def _field(d: dict[str, Any], key: str, default: Any) -> Any:
    if key not in d or d[key] is None:
        if default is _MISSING:
            raise ConfigError(f"config.json is missing required field {key!r}")
        return default
    return d[key]


def _int(d: dict[str, Any], key: str, default: Any = _MISSING) -> int:
    v = _field(d, key, default)
    return v if v is default else _as_int(key, v)


def _float(d: dict[str, Any], key: str, default: Any = _MISSING) -> float:
    v = _field(d, key, default)
    return v if v is default else _as_float(key, v)


def _as_int(key: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{key} must be an integer, got {v!r}")
    return v


def _as_float(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{key} must be a number, got {v!r}")
    return float(v)
