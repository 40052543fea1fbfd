"""Forward pass of Llama-family decoders (Llama, Mistral, Qwen2, Qwen3) over a flattened, paged batch.

Weights are plain tensors, loaded straight from safetensors; Q/K/V and gate/up projections are fused so each
layer runs three big matmuls instead of seven. The loader is strict: it reads exactly the tensors (and biases) the
config declares and refuses a checkpoint with any tensor missing, left over, quantized or of the wrong shape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pdserve.engine import native
from pdserve.engine.attention import AttentionMetadata, DecodeKernel, PrefillKernel, paged_attention
from pdserve.engine.linear import Linear
from pdserve.engine.weights import CheckpointReader, check_quantization
from pdserve.kvcache import KVCache

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_UNSUPPORTED_ROPE_TYPES = ("longrope",)  # switches frequencies with the sequence length; not implemented


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    has_qk_norm: bool
    intermediate_size: int = 0
    # Biases, as transformers' module for the architecture creates them from the config.
    qkv_bias: bool = False  # Qwen2 always; Llama and Qwen3 with attention_bias
    o_bias: bool = False  # Llama and Qwen3 with attention_bias
    mlp_bias: bool = False  # Llama with mlp_bias: gate, up and down

    @classmethod
    def from_hf(cls, config: PretrainedConfig) -> ModelShape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        arch = (config.architectures or [""])[0]
        attention_bias = arch in ("LlamaForCausalLM", "Qwen3ForCausalLM") and bool(
            getattr(config, "attention_bias", False)
        )
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_position_embeddings,
            has_qk_norm=arch == "Qwen3ForCausalLM",
            intermediate_size=config.intermediate_size,
            qkv_bias=attention_bias or arch == "Qwen2ForCausalLM",
            o_bias=attention_bias,
            mlp_bias=arch == "LlamaForCausalLM" and bool(getattr(config, "mlp_bias", False)),
        )


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: Linear  # hidden -> (H + 2 H_kv) D; fused bias where the config declares one (Qwen2, attention_bias)
    q_norm: torch.Tensor | None  # [D], Qwen3
    k_norm: torch.Tensor | None
    o: Linear  # H D -> hidden; bias with attention_bias (Llama, Qwen3)
    post_norm: torch.Tensor
    gate_up: Linear  # hidden -> 2 intermediate; fused bias with mlp_bias (Llama)
    down: Linear  # intermediate -> hidden; bias with mlp_bias


def check_supported(config: PretrainedConfig) -> None:
    """Raise ValueError unless the checkpoint is a Llama-family decoder this forward computes exactly."""
    arch = (config.architectures or ["<none>"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r}; pdserve supports {', '.join(SUPPORTED_ARCHITECTURES)}")
    check_quantization(config)
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {config.hidden_act!r}; only silu is implemented")
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type in _UNSUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers computes it: the variance in float32, the weight applied in the input dtype.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, D]; cos, sin: [T, 1, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class CausalLM:
    """Weights and forward of one Llama-family checkpoint."""

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, device: torch.device) -> None:
        check_supported(config)
        self.shape = ModelShape.from_hf(config)
        self.dtype, self.device = dtype, device
        self.scale = self.shape.head_dim**-0.5
        self.cos, self.sin = _rope_tables(config, self.shape.max_position_embeddings, dtype, device)
        self.embed = torch.empty(0)
        self.lm_head: Linear | None = None
        self.norm = torch.empty(0)
        self.layers: list[LayerWeights] = []
        self.decode_kernel: DecodeKernel | None = None
        self.prefill_kernel: PrefillKernel | None = None
        self.fused: native.FusedOps | None = None  # the layer's elementwise glue as one op each (bf16 on CPU)
        s = self.shape
        if device.type == "cpu" and native.kernels_supported(dtype, s.head_dim, s.num_heads, s.num_kv_heads):
            self.decode_kernel = native.paged_decode_op()  # built here, before any request waits on it
            self.prefill_kernel = native.paged_prefill_op()
            self.fused = native.fused_ops()

    def tensor_shapes(self, tie_word_embeddings: bool) -> dict[str, tuple[int, ...]]:
        """Every tensor the config declares, by checkpoint name, with its shape: exactly what `load` reads."""
        s = self.shape
        hidden, inter = s.hidden_size, s.intermediate_size
        q_out, kv_out = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (s.vocab_size, hidden),
            "model.norm.weight": (hidden,),
        }
        if not tie_word_embeddings:
            shapes["lm_head.weight"] = (s.vocab_size, hidden)
        for i in range(s.num_layers):
            layer, attn, mlp = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            shapes[layer + "input_layernorm.weight"] = (hidden,)
            shapes[layer + "post_attention_layernorm.weight"] = (hidden,)
            projections = {
                attn + "q_proj": (q_out, hidden, s.qkv_bias),
                attn + "k_proj": (kv_out, hidden, s.qkv_bias),
                attn + "v_proj": (kv_out, hidden, s.qkv_bias),
                attn + "o_proj": (hidden, q_out, s.o_bias),
                mlp + "gate_proj": (inter, hidden, s.mlp_bias),
                mlp + "up_proj": (inter, hidden, s.mlp_bias),
                mlp + "down_proj": (hidden, inter, s.mlp_bias),
            }
            for name, (out_features, in_features, bias) in projections.items():
                shapes[name + ".weight"] = (out_features, in_features)
                if bias:
                    shapes[name + ".bias"] = (out_features,)
            if s.has_qk_norm:
                shapes[attn + "q_norm.weight"] = (s.head_dim,)
                shapes[attn + "k_norm.weight"] = (s.head_dim,)
        return shapes

    def load(self, reader: CheckpointReader, tie_word_embeddings: bool) -> None:
        """Read every tensor the config declares; ValueError (before reading any) if the checkpoint lacks one or
        holds one this model would not use, and while reading if one has another shape or a non-float dtype."""
        shapes = self.tensor_shapes(tie_word_embeddings)
        # A tied checkpoint may still carry lm_head.weight; transformers then uses it (untied) if it differs.
        reader.check_names(shapes, optional=["lm_head.weight"] if tie_word_embeddings else [])

        def get(name: str) -> torch.Tensor:
            return reader.get(name, shapes[name])

        self.embed = get("model.embed_tokens.weight")
        self.norm = get("model.norm.weight")
        lm_head = self.embed
        if not tie_word_embeddings:
            lm_head = get("lm_head.weight")
        elif reader.has("lm_head.weight"):
            stored = reader.get("lm_head.weight", shapes["model.embed_tokens.weight"])
            if not torch.equal(stored, self.embed):
                logger.warning("tie_word_embeddings is set but lm_head.weight differs from the embeddings: using it")
                lm_head = stored
        self.lm_head = Linear(lm_head)
        self.layers = [self._load_layer(get, f"model.layers.{i}.") for i in range(self.shape.num_layers)]

    def _load_layer(self, get: Callable[[str], torch.Tensor], prefix: str) -> LayerWeights:
        attn, mlp, s = prefix + "self_attn.", prefix + "mlp.", self.shape

        def fused(names: list[str], bias: bool) -> Linear:
            weight = torch.cat([get(name + ".weight") for name in names])
            return Linear(weight, torch.cat([get(name + ".bias") for name in names]) if bias else None)

        return LayerWeights(
            input_norm=get(prefix + "input_layernorm.weight"),
            qkv=fused([attn + f"{p}_proj" for p in "qkv"], s.qkv_bias),
            q_norm=get(attn + "q_norm.weight") if s.has_qk_norm else None,
            k_norm=get(attn + "k_norm.weight") if s.has_qk_norm else None,
            o=fused([attn + "o_proj"], s.o_bias),
            post_norm=get(prefix + "post_attention_layernorm.weight"),
            gate_up=fused([mlp + "gate_proj", mlp + "up_proj"], s.mlp_bias),
            down=fused([mlp + "down_proj"], s.mlp_bias),
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv: KVCache,
        meta: AttentionMetadata,
        on_layer: Callable[[int], object] | None = None,
    ) -> torch.Tensor:
        """Hidden states `[T, hidden]` after the final norm; writes each row's K/V into `kv` at its slot and calls
        `on_layer(i)` once layer i's K/V are written (before its MLP: the MLP overlaps whatever the hook starts)."""
        x = self.embed[input_ids]  # [T, hidden]
        if self.fused is not None:
            return self._forward_fused(self.fused, x, self.cos[positions], self.sin[positions], kv, meta, on_layer)
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1)
        for i, layer in enumerate(self.layers):
            # In place where the tensor is ours alone (x is a fresh copy from the embedding lookup).
            x += self._attention(layer, rms_norm(x, layer.input_norm, self.shape.rms_norm_eps), cos, sin, kv, i, meta)
            if on_layer is not None:
                on_layer(i)
            h = rms_norm(x, layer.post_norm, self.shape.rms_norm_eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x += layer.down(F.silu(gate, inplace=True).mul_(up))
        return rms_norm(x, self.norm, self.shape.rms_norm_eps)

    def _forward_fused(
        self,
        ops: native.FusedOps,
        x: torch.Tensor,
        cos: torch.Tensor,  # [T, D]
        sin: torch.Tensor,
        kv: KVCache,
        meta: AttentionMetadata,
        on_layer: Callable[[int], object] | None,
    ) -> torch.Tensor:
        """`forward` with the fused glue ops: each residual add is fused with the norm after it (the next layer's
        input norm, or the final norm), as vLLM's fused_add_rms_norm."""
        eps = self.shape.rms_norm_eps
        h = ops.rms_norm(x, self.layers[0].input_norm, eps)
        for i, layer in enumerate(self.layers):
            h = ops.add_rms_norm_(x, self._attention(layer, h, cos, sin, kv, i, meta), layer.post_norm, eps)
            if on_layer is not None:
                on_layer(i)
            next_norm = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
            h = ops.add_rms_norm_(x, layer.down(ops.silu_and_mul(layer.gate_up(h))), next_norm, eps)
        return h

    def _attention(
        self,
        layer: LayerWeights,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: KVCache,
        layer_idx: int,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        s, num_tokens = self.shape, h.shape[0]
        qkv = layer.qkv(h).view(num_tokens, s.num_heads + 2 * s.num_kv_heads, s.head_dim)
        qk, v = qkv.split([s.num_heads + s.num_kv_heads, s.num_kv_heads], dim=1)
        if layer.q_norm is not None and layer.k_norm is not None:
            q, k = qk.split([s.num_heads, s.num_kv_heads], dim=1)
            qk = torch.cat([rms_norm(q, layer.q_norm, s.rms_norm_eps), rms_norm(k, layer.k_norm, s.rms_norm_eps)], 1)
        rotated = apply_rope(qk, cos, sin) if self.fused is None else self.fused.rope(qk, cos, sin)
        q, k = rotated.split([s.num_heads, s.num_kv_heads], dim=1)  # one rope for Q and K
        out = paged_attention(
            q, k, v, kv.k[layer_idx], kv.v[layer_idx], meta, self.scale, self.decode_kernel, self.prefill_kernel
        )
        return layer.o(out.reshape(num_tokens, s.num_heads * s.head_dim))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits `[rows, vocab]` for the given rows only (the ones that sample)."""
        assert self.lm_head is not None
        return self.lm_head(hidden)


def _rope_tables(
    config: PretrainedConfig, max_positions: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for every position `[max_positions, D]`, computed as transformers' Llama rotary module computes them:
    its inverse frequencies (`ROPE_INIT_FUNCTIONS`), then the same float32 ops, so that default, linear, llama3 and
    yarn RoPE match it bit for bit (tests/test_rope.py) without importing its modeling code, which costs every
    replica start ~3 s of CPU. Dynamic NTK changes its frequencies only past max_position_embeddings, which bounds
    max_model_len: below it its table is the default one (bit for bit). longrope is refused (check_supported)."""
    params = config.rope_parameters
    rope_type = params["rope_type"]
    if rope_type == "dynamic" and max_positions > config.max_position_embeddings:
        raise ValueError("dynamic rope scales past max_position_embeddings; pdserve serves positions below it only")
    if rope_type in ("default", "dynamic"):  # dynamic NTK equals the default below max_position_embeddings
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        scaling = 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
    freqs = torch.arange(max_positions)[:, None].float() * inv_freq.to(dtype=torch.float)
    angles = torch.cat((freqs, freqs), dim=-1)
    return (angles.cos() * scaling).to(dtype).to(device), (angles.sin() * scaling).to(dtype).to(device)
