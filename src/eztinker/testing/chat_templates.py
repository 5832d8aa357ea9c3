"""Chat templates that render tools (`eztinker.testing`), for tests of tool calling without a model hub.

Both are ChatML, written here in the two call formats of Qwen's templates: `TOOLS_JSON_TEMPLATE` teaches
`<tool_call>` blocks holding `{"name", "arguments"}` JSON (Qwen2.5 / Qwen3 / Hermes), and
`TOOLS_XML_TEMPLATE` blocks of `<function=...>` with one `<parameter=...>` per argument (Qwen3-Coder /
Qwen3.5). Each renders the tools in the system turn, an assistant's `tool_calls` in its format and
`tool` results as `<tool_response>` blocks in a user turn, as those templates do.
`with_chat_template` copies a model directory with another template.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

_SYSTEM_AND_TOOLS = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call these functions:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\n' + INSTRUCTIONS + '<|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
)

_TURNS = (
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') }}"
    "{%- for call in message.tool_calls or [] %}"
    "{%- if call.function is defined %}{%- set call = call.function %}{%- endif %}"
    "{%- if message.content or not loop.first %}{{- '\\n' }}{%- endif %}"
    "CALL"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_JSON_INSTRUCTIONS = (
    '\'To call one, answer with <tool_call>\\n{"name": <name>, "arguments": <arguments>}\\n</tool_call>\''
)
_JSON_CALL = (
    '{{- \'<tool_call>\\n{"name": "\' + call.name + \'", "arguments": \' + (call.arguments | tojson)'
    " + '}\\n</tool_call>' }}"
)
_XML_INSTRUCTIONS = (
    "'To call one, answer with <tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n"
    "</function>\\n</tool_call>'"
)
_XML_CALL = (
    "{{- '<tool_call>\\n<function=' + call.name + '>\\n' }}"
    "{%- for key, value in call.arguments.items() %}"
    "{{- '<parameter=' + key + '>\\n' + (value if value is string else value | tojson) + '\\n</parameter>\\n' }}"
    "{%- endfor %}"
    "{{- '</function>\\n</tool_call>' }}"
)

TOOLS_JSON_TEMPLATE = _SYSTEM_AND_TOOLS.replace("INSTRUCTIONS", _JSON_INSTRUCTIONS) + _TURNS.replace(
    "CALL", _JSON_CALL
)
"""ChatML with tools; calls as `<tool_call>` JSON blocks (the format of Qwen2.5 / Qwen3 / Hermes)."""

TOOLS_XML_TEMPLATE = _SYSTEM_AND_TOOLS.replace("INSTRUCTIONS", _XML_INSTRUCTIONS) + _TURNS.replace(
    "CALL", _XML_CALL
)
"""ChatML with tools; calls as `<function=...>` / `<parameter=...>` blocks (Qwen3-Coder / Qwen3.5)."""


def with_chat_template(
    model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], template: str | None
) -> Path:
    """A copy of `model_dir` in `out_dir` whose tokenizer has `template` as its chat template (None: no
    chat template at all). Returns `out_dir` as a `Path`."""
    out = Path(out_dir)
    shutil.copytree(model_dir, out)
    for saved in out.glob("chat_template.*"):
        saved.unlink()
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    if template is not None:
        config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out
