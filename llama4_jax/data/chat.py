"""The Llama 4 chat format: one renderer for SFT (tokens + loss mask) and for serving (prompts).

It reproduces the release's chat template (`chat_template` in transformers' `processing_llama4.py`,
rendered by jinja2 with trim_blocks/lstrip_blocks as `apply_chat_template` does) token for token:

  <|begin_of_text|>
  a leading system message      <|header_start|>system<|header_end|>\\n\\n{content, trimmed}<|eot|>
  system / user / assistant     <|header_start|>{role}<|header_end|>\\n\\n{content}<|eot|>
  assistant with tool_calls     <|header_start|>assistant<|header_end|>\\n\\n<|python_start|>{content}
                                <|python_end|>{"name": "{name}", "parameters": {arguments as JSON}}...<|eot|>
  tool / ipython                <|header_start|>ipython<|header_end|>\\n\\n{content}<|eot|>: the content is
                                JSON-encoded unless it is a number or bool (the template tests `is iterable`,
                                which strings pass: "72F" renders as "\\"72F\\"")
  add_generation_prompt         <|header_start|>assistant<|header_end|>\\n\\n

With `tools` (JSON schemas), the system turn starts with "Environment: ipython\\n" and the tools are listed,
after the template's instructions, in the first user turn (`tools_in_user_message`, the default; that turn
is trimmed) or in the system turn. Inputs the template would drop or garble (an empty `tool_calls` list, a
system prompt of several items, unknown content items) raise instead.

Tokenisation is transformers': each run of text between special tokens is encoded in one piece (so the
header's "\\n\\n" joins the start of the content). Special-token strings inside message text stay text, as
with `apply_chat_template(..., sanitize_control_tokens=True)`; the exception is `<|image|>`, which marks
where an image's token block goes (`prompt.py` builds the blocks; `{"type": "image"}` items mark them too).

Loss mask (SFT): 1 on each token holding a character of an assistant turn's content or one of its closing
tokens (`<|eot|>`; for a tool-call turn everything from `<|python_start|>` to `<|eot|>`); 0 on headers,
other turns and image blocks.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from llama4_jax.data.sources import CHAT_ROLES, Message
from llama4_jax.data.tokenizers import Tokenizer

IMAGE_PLACEHOLDER = "<|image|>"  # what prompts write where an image goes
BEGIN_OF_TEXT = "<|begin_of_text|>"
HEADER_START, HEADER_END, EOT = "<|header_start|>", "<|header_end|>", "<|eot|>"
PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"
TOOL_ROLES = ("tool", "ipython")  # rendered under the ipython header

# The release template's instructions around a tool list, verbatim.
_CALL_FORMAT = ('Respond in the format {"name": function name, "parameters": dictionary of argument name and '
                'its value}.Do not use variables.\n\n')
_TOOLS_IN_SYSTEM = ("You have access to the following functions. To call a function, please respond with JSON "
                    "for a function call." + _CALL_FORMAT)
_TOOLS_IN_USER = ("Given the following functions, please respond with a JSON for a function call with its "
                  "proper arguments that best answers the given prompt.\n\n" + _CALL_FORMAT)


@dataclasses.dataclass(frozen=True)
class Special:
  """A special token, by name, inside a rendered prompt."""

  name: str


@dataclasses.dataclass(frozen=True)
class ImageSlot:
  """Where the next image's token block goes."""


Part = str | Special | ImageSlot


class Piece(NamedTuple):
  """A part of a rendered chat and whether it is trained (in the SFT loss mask)."""

  part: Part
  trained: bool = False


# --------------------------------------------------------------------------------------------------
# Rendering


def _special(name: str, trained: bool = False) -> Piece:
  return Piece(Special(name), trained)


def _header(role: str) -> list[Piece]:
  return [_special(HEADER_START), Piece(role), _special(HEADER_END), Piece("\n\n")]


def _text(text: str, trained: bool = False) -> list[Piece]:
  """Text as pieces, each `<|image|>` placeholder becoming an image slot."""
  first, *rest = text.split(IMAGE_PLACEHOLDER)
  parts: list[Part] = [first]
  for r in rest:
    parts += [ImageSlot(), r]
  return [Piece(p, trained and isinstance(p, str)) for p in parts if p != ""]


def _content(content, where: str, trained: bool = False) -> list[Piece]:
  """A string, or transformers-style items [{"type": "text", "text": ...} | {"type": "image"}]."""
  if isinstance(content, str):
    return _text(content, trained)
  if not isinstance(content, Sequence):
    raise ValueError(f"{where}: content must be a string or a list of items, got {type(content).__name__}")
  out = []
  for k, item in enumerate(content):
    kind = item.get("type") if isinstance(item, Mapping) else None
    if kind == "image":
      out.append(Piece(ImageSlot()))
    elif kind == "text" and isinstance(item.get("text"), str):
      out += _text(item["text"], trained)
    else:
      raise ValueError(f"{where}: content item {k} must be {{'type': 'text', 'text': ...}} or "
                       f"{{'type': 'image'}}, got {item!r}")
  return out


def _json(value, where: str, indent: int | None = None) -> str:
  """transformers' `tojson` filter (json.dumps, non-ASCII kept)."""
  try:
    return json.dumps(value, ensure_ascii=False, indent=indent)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: not JSON-serialisable ({e})") from None


def _is_iterable(value) -> bool:
  """Jinja's `is iterable` test (true for strings too)."""
  try:
    iter(value)
  except TypeError:
    return False
  return True


def _tool_result(content, where: str) -> str:
  if content is None:
    raise ValueError(f"{where}: a tool message needs content")
  return _json(content, where) if _is_iterable(content) else str(content)  # mappings are iterable


def _tool_calls(calls, where: str) -> str:
  """The calls as the template writes them: {"name": "...", "parameters": ...} back to back."""
  if isinstance(calls, (str, Mapping)) or not isinstance(calls, Sequence) or not calls:
    raise ValueError(f"{where}: tool_calls must be a non-empty list (the release template drops a message "
                     f"whose tool_calls list is empty), got {calls!r}")
  out = []
  for k, call in enumerate(calls):
    fn = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or "arguments" not in fn:
      raise ValueError(f"{where}: tool_calls[{k}] must be {{'function': {{'name': str, 'arguments': ...}}}}, "
                       f"got {call!r}")
    out.append('{"name": "' + fn["name"] + '", "parameters": ' + _json(fn["arguments"], where) + "}")
  return "".join(out)


def _tool_list(tools) -> str:
  if isinstance(tools, (str, Mapping)) or not isinstance(tools, Sequence):
    raise ValueError(f"tools must be a list of JSON schemas, got {type(tools).__name__}")
  return "".join(_json(t, f"tools[{k}]", indent=4) + "\n\n" for k, t in enumerate(tools))


def _as_message(m, where: str) -> Message:
  if isinstance(m, Message):
    msg = m
  elif isinstance(m, Mapping) and "role" in m:
    msg = Message(m["role"], m.get("content"), m.get("tool_calls"))  # None = absent, as transformers does
  else:
    raise ValueError(f"{where}: expected a Message or a mapping with 'role' and 'content', got {m!r}")
  if msg.role not in CHAT_ROLES:
    raise ValueError(f"{where}: role must be one of {CHAT_ROLES}, got {msg.role!r}")
  if msg.tool_calls is not None and msg.role != "assistant":
    raise ValueError(f"{where}: only assistant messages carry tool_calls, not {msg.role!r} ones")
  return msg


def _system_turn(m: Message, where: str, tools, tools_in_user_message: bool) -> list[Piece]:
  """A leading system message, trimmed (of a list content the template reads only the first item's text)."""
  content = m.content
  if isinstance(content, Sequence) and not isinstance(content, str) and len(content) == 1:
    content = content[0].get("text") if isinstance(content[0], Mapping) else None
  if not isinstance(content, str):
    raise ValueError(f"{where}: a leading system message must be a string or a single text item, got {m.content!r}")
  head = ""
  if tools is not None:
    head = "Environment: ipython\n" + ("" if tools_in_user_message else _TOOLS_IN_SYSTEM + _tool_list(tools))
  return _header("system") + _text(head + content.strip()) + [_special(EOT)]


def _tools_user_turn(m: Message | None, where: str, tools) -> list[Piece]:
  """The first user turn with the tool list in front of it (the turn's text is trimmed)."""
  if m is None or m.role != "user" or not isinstance(m.content, str):
    raise ValueError(f"{where}: with tools in the user message, the first message after the system prompt must be "
                     f"a user message with string content, got {m!r}")
  return _header("user") + _text(_TOOLS_IN_USER + _tool_list(tools) + m.content.strip()) + [_special(EOT)]


def _turn(m: Message, where: str) -> list[Piece]:
  """Any message after the leading system/tools turns."""
  if m.role in TOOL_ROLES:
    return _header("ipython") + _text(_tool_result(m.content, where)) + [_special(EOT)]
  if m.tool_calls is not None:
    content = [] if m.content is None else _content(m.content, where, trained=True)
    return (_header("assistant") + [_special(PYTHON_START, True), *content, _special(PYTHON_END, True),
                                    *_text(_tool_calls(m.tool_calls, where), True), _special(EOT, True)])
  if m.content is None:
    raise ValueError(f"{where}: a {m.role} message needs content")
  trained = m.role == "assistant"
  return _header(m.role) + _content(m.content, where, trained) + [_special(EOT, trained)]


def chat_pieces(messages: Sequence[Message | Mapping], *, add_generation_prompt: bool = False, tools=None,
                tools_in_user_message: bool = True) -> list[Piece]:
  """A conversation (`Message`s or {"role", "content"[, "tool_calls"]} mappings) as pieces (module docstring)."""
  if not messages:
    raise ValueError("a chat needs at least one message")
  msgs = [_as_message(m, f"message {i}") for i, m in enumerate(messages)]
  pieces, i = [_special(BEGIN_OF_TEXT)], 0
  if msgs[0].role == "system":
    pieces += _system_turn(msgs[0], "message 0", tools, tools_in_user_message)
    i = 1
  elif tools is not None and not tools_in_user_message:
    raise ValueError("tools_in_user_message=False lists the tools in the system turn, but there is no system "
                     "message (the release template would drop the tools)")
  if tools is not None and tools_in_user_message:
    pieces += _tools_user_turn(msgs[i] if i < len(msgs) else None, f"message {i}", tools)
    i += 1
  for k in range(i, len(msgs)):
    pieces += _turn(msgs[k], f"message {k}")
  if add_generation_prompt:
    pieces += _header("assistant")
  return pieces


def chat_parts(messages: Sequence[Message | Mapping], add_generation_prompt: bool = True, **kw) -> list[Part]:
  """The rendered conversation as text, special tokens and image slots (`chat_pieces` without the mask)."""
  return [p.part for p in chat_pieces(messages, add_generation_prompt=add_generation_prompt, **kw)]


def prompt_messages(prompt) -> Sequence:
  """A prompt's messages: a string is one user turn."""
  return [Message("user", prompt)] if isinstance(prompt, str) else prompt


def prompt_list(prompts) -> list:
  """One prompt (a string or a message list) or a list of prompts -> a list of prompts."""
  if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (Mapping, Message))):
    return [prompts]
  return list(prompts)


def prompt_pieces(prompt, *, chat: bool = True, add_generation_prompt: bool = True) -> list[Piece]:
  """Pieces of one prompt: in the chat format, or (`chat=False`, a string) bos + the raw text."""
  if chat or not isinstance(prompt, str):
    return chat_pieces(prompt_messages(prompt), add_generation_prompt=add_generation_prompt)
  return [_special(BEGIN_OF_TEXT), *_text(prompt)]


def prompt_parts(prompt, *, chat: bool = True, add_generation_prompt: bool = True) -> list[Part]:
  return [p.part for p in prompt_pieces(prompt, chat=chat, add_generation_prompt=add_generation_prompt)]


def render(parts: Sequence[Part]) -> str:
  """The prompt as text (image slots shown as `<|image|>`): the release template's output."""
  return "".join(p if isinstance(p, str) else p.name if isinstance(p, Special) else IMAGE_PLACEHOLDER
                 for p in parts)


# --------------------------------------------------------------------------------------------------
# Token ids


def _leading_tokens_within(tokenizer: Tokenizer, ids: Sequence[int], prefix: str) -> int:
  """How many leading tokens spell part of `prefix` (a token crossing its end does not count)."""
  n = 0
  while n < len(ids) and prefix.startswith(tokenizer.decode(ids[:n + 1])):
    n += 1
  return n


def _encode_run(tokenizer: Tokenizer, run: Sequence[Piece]) -> tuple[list[int], list[int]]:
  """One run of text in one piece; its mask is 0 on an untrained head (a header's "\\n\\n"), 1 after."""
  ids = tokenizer.encode("".join(p.part for p in run))
  n_head = next((k for k, p in enumerate(run) if p.trained), len(run))
  if any(not p.trained for p in run[n_head:]):
    raise ValueError("a run of text goes from trained to untrained text, which chat rendering never produces")
  if n_head == len(run):
    return ids, [0] * len(ids)
  head = "".join(p.part for p in run[:n_head])
  n_untrained = _leading_tokens_within(tokenizer, ids, head) if head else 0
  return ids, [0] * n_untrained + [1] * (len(ids) - n_untrained)


def encode(tokenizer: Tokenizer, pieces: Sequence[Piece],
           image_blocks: Sequence[Sequence[int]] = ()) -> tuple[list[int], list[int]]:
  """Token ids and loss mask: runs of text encoded in one piece, specials by id, image slots filled in order
  with `image_blocks` (the token ids of each image, see `prompt.image_token_ids`; never trained)."""
  n_slots = sum(isinstance(p.part, ImageSlot) for p in pieces)
  if n_slots != len(image_blocks):
    raise ValueError(f"{n_slots} {IMAGE_PLACEHOLDER} placeholders but {len(image_blocks)} images")
  ids: list[int] = []
  mask: list[int] = []
  run: list[Piece] = []
  blocks = iter(image_blocks)
  for p in [*pieces, None]:
    if p is not None and isinstance(p.part, str):
      run.append(p)
      continue
    if run:
      run_ids, run_mask = _encode_run(tokenizer, run)
      ids += run_ids
      mask += run_mask
      run = []
    if p is None:
      break
    if isinstance(p.part, Special):
      ids.append(tokenizer.token_id(p.part.name))
      mask.append(int(p.trained))
    else:
      block = list(next(blocks))
      ids += block
      mask += [0] * len(block)
  return ids, mask


def render_chat(messages: Sequence[Message | Mapping], tokenizer: Tokenizer, *, add_generation_prompt: bool = False,
                tools=None, tools_in_user_message: bool = True,
                image_blocks: Sequence[Sequence[int]] = ()) -> dict[str, np.ndarray]:
  """{"tokens", "loss_mask"} (int32, same length) of one conversation: SFT examples and generation prompts."""
  pieces = chat_pieces(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                       tools_in_user_message=tools_in_user_message)
  ids, mask = encode(tokenizer, pieces, image_blocks)
  return {"tokens": np.asarray(ids, np.int32), "loss_mask": np.asarray(mask, np.int32)}
