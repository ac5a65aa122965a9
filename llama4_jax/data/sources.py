"""Reading raw documents: plain text files, JSONL with a text field, chat JSONL for SFT.

Every reader returns plain Python data (strings, message lists); tokenisation happens in
`pipeline.py`. Malformed input fails with the file and line in the message.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# Roles of chat messages; "tool" is rendered as "ipython", as Llama 4's chat format does.
CHAT_ROLES = ("system", "user", "assistant", "tool", "ipython")


class DataFormatError(ValueError):
  """A source file does not have the expected format; the message names file and line."""


@dataclasses.dataclass(frozen=True)
class Message:
  """One chat message, as `chat.py` renders it."""

  role: str  # one of CHAT_ROLES
  # Text (`<|image|>` marks an image) or [{"type": "text", "text": ...} | {"type": "image"}]; a tool result may
  # be any JSON value; None in an assistant tool-call turn without text.
  content: Any
  # Assistant tool calls [{"function": {"name": str, "arguments": JSON}}], as transformers takes them; None: none.
  tool_calls: Sequence[dict] | None = None


def read_text_documents(paths: Sequence[str | Path], separator: str | None = None) -> list[str]:
  """One document per file, or, with `separator`, the non-empty pieces of each file split on it."""
  docs = []
  for path in paths:
    text = Path(path).read_text(encoding="utf-8")
    pieces = [text] if separator is None else text.split(separator)
    docs.extend(p for p in pieces if p.strip())
  return docs


def _jsonl_records(path: str | Path) -> Iterator[tuple[int, dict]]:
  """(line number, object) for every non-blank line of a JSONL file."""
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(record, dict):
        raise DataFormatError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
      yield line_no, record


def read_jsonl_texts(path: str | Path, field: str = "text") -> list[str]:
  """The string `field` of every line of a JSONL file."""
  texts = []
  for line_no, record in _jsonl_records(path):
    if field not in record:
      raise DataFormatError(f"{path}:{line_no}: missing field {field!r} (has {sorted(record)})")
    if not isinstance(record[field], str):
      raise DataFormatError(f"{path}:{line_no}: field {field!r} must be a string")
    texts.append(record[field])
  return texts


def _chat_message(m, where: str) -> Message:
  """A message of chat JSONL: string content, except for tool results (any JSON) and tool-call turns."""
  if not isinstance(m, dict) or not isinstance(m.get("role"), str):
    raise DataFormatError(f"{where} needs string fields 'role' and 'content'")
  role, content, calls = m["role"], m.get("content"), m.get("tool_calls")
  if role not in CHAT_ROLES:
    raise DataFormatError(f"{where} has unknown role {role!r} (expected one of {CHAT_ROLES})")
  if calls is not None and (role != "assistant" or not isinstance(calls, list) or not calls):
    raise DataFormatError(f"{where}: 'tool_calls' must be a non-empty list on an assistant message")
  if role in ("tool", "ipython"):
    if content is None:
      raise DataFormatError(f"{where}: a {role} message needs a non-null 'content'")
  elif not isinstance(content, str) and not (calls and content is None):
    raise DataFormatError(f"{where} needs string fields 'role' and 'content'")
  return Message(role, content, calls)


def read_chat_jsonl(path: str | Path) -> list[list[Message]]:
  """Conversations from lines `{"messages": [{"role": ..., "content": ...[, "tool_calls": [...]]}, ...]}`."""
  conversations = []
  for line_no, record in _jsonl_records(path):
    where = f"{path}:{line_no}"
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
      raise DataFormatError(f"{where}: expected a non-empty list in field 'messages'")
    conversation = [_chat_message(m, f"{where}: messages[{k}]") for k, m in enumerate(messages)]
    if not any(m.role == "assistant" for m in conversation):
      raise DataFormatError(f"{where}: no assistant message, so nothing to train on")
    conversations.append(conversation)
  return conversations
