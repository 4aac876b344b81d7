"""A recipe's `chat_template:`, as mergekit 0.1.5 reads it (merge.py's `_set_chat_template`): the
name of one of its built-in templates, `auto` (the template most of the recipe's models have), or
a template's text.

The named templates below are ours, written from each chat format. tests/test_recipe_chat_templates.py
renders them and mergekit's own files as transformers renders a chat template, on the same
conversations, and requires the same text: where mergekit's layout is not the format's usual one
(a newline after each Llama 3 turn; no blank line before Alpaca's generation prompt) ours keeps
it, so that a recipe gives the same prompts under both. Every tag trims the whitespace around it
and newlines are written as strings, so they render the same whatever Jinja's trim settings.

`exaone` differs on purpose: mergekit's file renders its own indentation and line breaks into every
prompt (`'        [|system|][|endofturn|]\n\n    [|user|]Hi\n        \n\n    [|assistant|]'`), which
is no EXAONE prompt a model was trained on. Ours renders EXAONE 3.0's turns as that file does once
its layout is taken out (`'[|system|][|endofturn|]\n[|user|]Hi\n[|assistant|]'`); the test holds it
to exactly that.

`auto`: each of mergekit's referenced models (the base, the `models:` or the slices' sources, each
model+adapter once) gives the template transformers' AutoTokenizer would load from its folder —
read from the files, no tokenizer built; the most common wins, the first seen among equals
(`Counter.most_common`). mergekit lists the models from a set, so among equals its pick can change
from one run to the next; ours is the first in the recipe's order."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable

from ...errors import CkptError
from .links import folder_file
from .schema import ModelRef, Recipe

CHATML = r"""{#- ChatML, as mergekit's `chatml` (written for ckptsurgery) -#}
{%- for message in messages -%}
    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""

LLAMA3 = r"""{#- Llama 3, as mergekit's `llama3`: contents trimmed, a newline after each <|eot_id|> -#}
{%- for message in messages -%}
    {{- (bos_token if loop.first else '') + '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'
        + message['content'] | trim + '<|eot_id|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- endif -%}
"""

MISTRAL = r"""{#- Mistral [INST], as mergekit's `mistral`: a first system message opens the first user turn -#}
{%- if messages[0]['role'] == 'system' -%}
    {%- set system = messages[0]['content'] -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set turns = messages -%}
{%- endif -%}
{{- bos_token -}}
{%- for message in turns -%}
    {%- if message['role'] != ('user' if loop.index0 is even else 'assistant') -%}
        {{- raise_exception('[INST] turns go user, assistant, user, ... after an optional first system message') -}}
    {%- elif message['role'] == 'user' -%}
        {{- ' [INST] ' + (system + '\n\n' if loop.first and system is defined else '') + message['content']
            + ' [/INST]' -}}
    {%- else -%}
        {{- ' ' + message['content'] + eos_token -}}
    {%- endif -%}
{%- endfor -%}
"""

ALPACA = r"""{#- Alpaca, as mergekit's `alpaca`: the last system message, a blank line, the turns
    (a blank line between two), and the generation prompt right after the last turn -#}
{%- set systems = messages | selectattr('role', 'equalto', 'system') | list -%}
{{- (systems | last)['content'] | trim if systems else '' -}}
{{- '\n\n' -}}
{%- set headers = {'user': '### Instruction:', 'user_context': '### Input:', 'assistant': '### Response:'} -%}
{%- for message in messages -%}
    {%- if message['role'] in headers -%}
        {{- headers[message['role']] + '\n' + message['content'] | trim + ('' if loop.last else '\n\n') -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}
    {{- '### Response:\n' -}}
{%- endif -%}
"""

EXAONE = r"""{#- EXAONE 3.0's turns, as mergekit's `exaone` without its file's indentation (written for ckptsurgery) -#}
{%- for message in messages -%}
    {%- if loop.first and message['role'] != 'system' -%}
        {{- '[|system|][|endofturn|]\n' -}}
    {%- endif -%}
    {{- '[|' + message['role'] + '|]' + message['content'] -}}
    {%- if message['role'] == 'user' -%}
        {{- '\n' -}}
    {%- else -%}
        {{- '[|endofturn|]\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '[|assistant|]' -}}
{%- endif -%}
"""

TEMPLATES = {"alpaca": ALPACA, "chatml": CHATML, "exaone": EXAONE, "llama3": LLAMA3, "mistral": MISTRAL}
AUTO = "auto"
MAX_FILE = 16 << 20  # a tokenizer_config.json is at most a few MB (its added tokens)


def recipe_template(value: str | None, folders: Iterable[str | None], notes: list[str]) -> str | None:
    """The template text a recipe's `chat_template:` gives, None for none (nothing set, or `auto`
    with no model having one): `folders` are the folders of mergekit's referenced models
    (`template_models`; None where a model has none). A CkptError refuses a text that is
    neither a name nor a template (mergekit refuses it too)."""
    if not value:
        return None
    if value == AUTO:
        found = [t.strip() for t in (folder_template(f, notes) for f in folders if f) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if value in TEMPLATES:
        return TEMPLATES[value]
    if len(value) < 20 or "{" not in value:  # mergekit's test for a template's text
        raise CkptError(f"chat_template: {value[:60]!r} is neither a template's text (Jinja) nor one of "
                        f"{', '.join([*TEMPLATES, AUTO])}")
    return value


def template_models(recipe: Recipe) -> tuple[ModelRef, ...]:
    """The models mergekit's `auto` asks (its `referenced_models`): the base, the `models:` or the
    slices' sources — not a slice's own base_model nor tokenizer_source — each once, in order."""
    found = [recipe.base_model] if recipe.base_model else []
    found += [e.model for e in recipe.models or ()] + [s.model for p in recipe.slices or () for s in p.sources]
    return tuple(dict.fromkeys(found))


def folder_template(folder: str, notes: list[str]) -> str | None:
    """The chat template transformers' AutoTokenizer loads from a folder (its "default" when it has
    several): chat_template.jinja and additional_chat_templates/*.jinja, when there are any, else
    tokenizer_config.json's `chat_template` (a text, or a list of {name, template}). It does not
    read chat_template.json (a processor's file), so neither do we. A file that cannot be read
    gives none, noted (mergekit goes on without a tokenizer it cannot load)."""
    try:
        jinja = os.path.join(folder, "chat_template.jinja")
        extra = os.path.join(folder, "additional_chat_templates")
        named = sorted(n for n in os.listdir(extra) if n.endswith(".jinja")) if os.path.isdir(extra) else []
        if os.path.isfile(jinja) or named:  # then tokenizer_config.json's is not read
            default = os.path.join("additional_chat_templates", "default.jinja") if "default.jinja" in named \
                else "chat_template.jinja"
            default = folder_file(folder, default, notes)  # a link out of the folder is not read
            return _read(default) if default is not None else None
        config = folder_file(folder, "tokenizer_config.json", notes)
        if config is None:
            return None
        value = json.loads(_read(config)).get("chat_template")
        if isinstance(value, list):
            value = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(value, dict):
            value = value.get("default")
        return value if isinstance(value, str) else None
    except (OSError, ValueError, AttributeError, TypeError, RecursionError) as e:  # TypeError: a name that is a list
        why = "nested too deeply" if isinstance(e, RecursionError) else getattr(e, "strerror", None) or e
        notes.append(f"{folder}: its chat template could not be read ({why}); "
                     f"chat_template: auto went on without it")
        return None


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:  # text mode, as transformers reads: \r\n read as \n
        text = f.read(MAX_FILE + 1)
    if len(text) > MAX_FILE:
        raise ValueError(f"larger than {MAX_FILE >> 20} MB")
    return text
