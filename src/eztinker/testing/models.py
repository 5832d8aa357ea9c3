"""Tiny random causal LMs (`eztinker.testing`): 2-layer models of every supported family, built with
`from_config` and saved with the tiny tokenizer, so the real `from_pretrained(path)` path is exercised.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from eztinker.testing.tokenizer import (
    _TINY_MAX_POSITIONS,
    _load_tokenizer,
    _patch_tokenizer_config,
    make_tiny_tokenizer,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_DenseFamily = Literal["qwen2", "gpt2", "phi", "phi3", "llama"]
_CatalogueFamily = Literal["qwen3_moe", "qwen3_5", "qwen3_5_moe", "gpt_oss", "deepseek_v3", "qwen3_vl"]

TinyFamily = Literal[_DenseFamily, _CatalogueFamily]
"""Model families `make_tiny_model` can build."""

TINY_FAMILIES: tuple[TinyFamily, ...] = get_args(_DenseFamily)
"""The dense families `make_tiny_model` can build, in a fixed order."""

TINY_CATALOGUE_FAMILIES: tuple[TinyFamily, ...] = get_args(_CatalogueFamily)
"""The families of Tinker's catalogue beyond the dense ones: MoE with fused experts (qwen3_moe, gpt_oss,
deepseek_v3 with MLA), hybrid gated-DeltaNet + full attention (qwen3_5, qwen3_5_moe), and a
vision-language model (qwen3_vl, with a tiny vision tower)."""

ALL_TINY_FAMILIES: tuple[TinyFamily, ...] = TINY_FAMILIES + TINY_CATALOGUE_FAMILIES

_TINY_HEADS = 4
_TINY_KV_HEADS = 2


def make_tiny_model(
    out_dir: str | os.PathLike[str],
    family: TinyFamily,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    tie_word_embeddings: bool | None = None,
) -> Path:
    """Build a tiny random causal LM of `family` and save it, with its tokenizer, to `out_dir`.

    The model has 4 attention heads (2 key/value heads where the family supports it), an MLP width of
    `4 * hidden_size`, 512 positions, and the tokenizer's vocabulary. Weights come from `from_config` under
    `torch.manual_seed(seed)` inside a forked RNG, so the global torch RNG is untouched and the same `seed`
    gives the same weights. The model is saved in eval mode as fp32 safetensors; its config and
    `generation_config` carry the tokenizer's eos and pad ids (and no bos).

    The tokenizer is loaded from `tokenizer_dir`, or trained with `make_tiny_tokenizer` when it is None.
    `tie_word_embeddings` overrides the family's default (tied for qwen2, llama and gpt2; untied for phi
    and phi3): a tied model shares one weight between its input embedding and its output head.
    At H=64, L=2 the models have 0.19M-0.26M parameters and build in well under a second.

    Returns `out_dir` as a `Path`; `AutoModelForCausalLM.from_pretrained(out_dir)` and
    `AutoTokenizer.from_pretrained(out_dir)` load it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if family not in ALL_TINY_FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; expected one of {ALL_TINY_FAMILIES}")
    if hidden_size % _TINY_HEADS != 0:
        raise ValueError(f"hidden_size={hidden_size} must be a multiple of the {_TINY_HEADS} attention heads")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer_dir = make_tiny_tokenizer(out)
    tok = _load_tokenizer(tokenizer_dir)
    if family in _VISION_FAMILIES:  # the vision placeholders get ids after the tiny vocabulary
        tok.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})

    config = _tiny_config(
        family,
        vocab_size=len(tok),
        hidden_size=hidden_size,
        num_layers=num_layers,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if tie_word_embeddings is not None:
        config.tie_word_embeddings = tie_word_embeddings
    if family in _VISION_FAMILIES:
        start, end, image, video = (tok.convert_tokens_to_ids(t) for t in VISION_TOKENS)
        config.vision_start_token_id, config.vision_end_token_id = start, end
        config.image_token_id, config.video_token_id = image, video
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # from_config leaves the model in train mode; GPT-2's dropout would then make logits differ
        # from a reloaded (eval-mode) copy.
        # Multimodal families are saved whole (vision tower included), as their hub checkpoints are.
        auto = AutoModelForImageTextToText if family in _SAVED_WHOLE else AutoModelForCausalLM
        model = auto.from_config(config, dtype=torch.float32).eval()

    gen = model.generation_config
    gen.eos_token_id = tok.eos_token_id
    gen.pad_token_id = tok.pad_token_id
    gen.bos_token_id = None
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    _patch_tokenizer_config(out)
    if family in _VISION_FAMILIES:
        _tiny_image_processor(config).save_pretrained(str(out))
    return out


VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
"""Qwen-VL's vision tokens, added to the tiny tokenizer of a vision family (ids 1024-1027)."""

_VISION_FAMILIES = ("qwen3_vl",)


def _tiny_image_processor(config: Any) -> Any:
    """Qwen-VL's image processor (the PIL one: no torchvision needed) for the tiny vision tower: a 32×32
    image becomes a 4×4 grid of 8-pixel patches, 4 tokens after the 2×2 merge; images are resized to
    between 16×16 and 64×64 pixels."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vision = config.vision_config
    return Qwen2VLImageProcessorPil(
        patch_size=vision.patch_size,
        merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size,
        min_pixels=16 * 16,
        max_pixels=64 * 64,
    )


_SAVED_WHOLE = ("qwen3_5", "qwen3_5_moe", "qwen3_vl")


def _tiny_config(
    family: TinyFamily,
    *,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    eos_token_id: int | None,
    pad_token_id: int | None,
) -> PretrainedConfig:
    """Return the `from_config` configuration for a tiny model of `family`."""
    from transformers import GPT2Config, LlamaConfig, Phi3Config, PhiConfig, Qwen2Config

    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "bos_token_id": None,
    }
    decoder: dict[str, Any] = {
        "hidden_size": hidden_size,
        "intermediate_size": 4 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": _TINY_HEADS,
        "max_position_embeddings": _TINY_MAX_POSITIONS,
        **common,
    }
    if family == "qwen2":
        return Qwen2Config(num_key_value_heads=_TINY_KV_HEADS, tie_word_embeddings=True, **decoder)
    if family == "llama":
        return LlamaConfig(num_key_value_heads=_TINY_KV_HEADS, tie_word_embeddings=True, **decoder)
    if family == "phi":
        return PhiConfig(**decoder)
    if family == "phi3":
        return Phi3Config(original_max_position_embeddings=_TINY_MAX_POSITIONS, **decoder)
    if family in TINY_CATALOGUE_FAMILIES:
        return _catalogue_config(family, hidden_size, num_layers, decoder)
    return GPT2Config(
        n_embd=hidden_size, n_layer=num_layers, n_head=_TINY_HEADS, n_positions=_TINY_MAX_POSITIONS, **common
    )


def _catalogue_config(
    family: TinyFamily, hidden_size: int, num_layers: int, decoder: dict[str, Any]
) -> PretrainedConfig:
    """Tiny configs of the catalogue families: 4 experts (top-2) of width H/2, 16-wide heads, and for the
    hybrids one full-attention layer after every linear-attention one; every matrix dimension a multiple
    of 4, as torch's grouped matmul wants."""
    from transformers import DeepseekV3Config, GptOssConfig, Qwen3MoeConfig
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5Config
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeConfig
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLConfig

    head_dim = hidden_size // _TINY_HEADS
    experts: dict[str, Any] = {"num_experts_per_tok": 2, "moe_intermediate_size": hidden_size // 2}
    gqa: dict[str, Any] = {**decoder, "num_key_value_heads": _TINY_KV_HEADS, "head_dim": head_dim}
    hybrid: dict[str, Any] = {
        **gqa,
        "linear_key_head_dim": head_dim,
        "linear_value_head_dim": head_dim,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_conv_kernel_dim": 4,
        "layer_types": ["linear_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
    }
    vision: dict[str, Any] = {
        "depth": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 8,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": hidden_size,
        "num_position_embeddings": 64,
    }
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**gqa, num_experts=4, norm_topk_prob=True, **experts)
    if family == "qwen3_5":
        return Qwen3_5Config(text_config=hybrid, vision_config={**vision, "deepstack_visual_indexes": []})
    if family == "qwen3_5_moe":
        text = {**hybrid, "num_experts": 4, "shared_expert_intermediate_size": hidden_size // 2, **experts}
        text.pop("intermediate_size")
        return Qwen3_5MoeConfig(text_config=text, vision_config={**vision, "deepstack_visual_indexes": []})
    if family == "gpt_oss":
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
        gpt_oss: dict[str, Any] = {**gqa, "intermediate_size": hidden_size // 2}
        return GptOssConfig(
            **gpt_oss,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=8,
            layer_types=layer_types,
            rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
        )
    if family == "deepseek_v3":
        mla: dict[str, Any] = {**decoder, "num_key_value_heads": _TINY_HEADS}
        return DeepseekV3Config(
            **mla,
            n_routed_experts=4,
            n_group=1,
            topk_group=1,
            n_shared_experts=1,
            first_k_dense_replace=1,
            q_lora_rank=hidden_size // 2,
            kv_lora_rank=hidden_size // 2,
            qk_rope_head_dim=head_dim // 2,
            qk_nope_head_dim=head_dim // 2,
            v_head_dim=head_dim,
            rope_interleave=True,
            **experts,
        )
    text = {
        **gqa,
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
    }
    return Qwen3VLConfig(
        text_config=text,
        vision_config={**vision, "deepstack_visual_indexes": [0]},
        tie_word_embeddings=True,
    )
