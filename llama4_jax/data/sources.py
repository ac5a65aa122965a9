"""Reading raw documents: plain text files, JSONL with a text field, chat JSONL for SFT.

Every reader returns plain Python data (strings, message lists); tokenisation happens in
`pipeline.py`. Malformed input fails with the file and line in the message.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

# Roles accepted in chat JSONL; "tool" is rendered as "ipython", as Llama 4's chat format does.
CHAT_ROLES = ("system", "user", "assistant", "tool", "ipython")


class DataFormatError(ValueError):
  """A source file does not have the expected format; the message names file and line."""


@dataclasses.dataclass(frozen=True)
class Message:
  role: str
  content: str


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


def read_chat_jsonl(path: str | Path) -> list[list[Message]]:
  """Conversations from lines `{"messages": [{"role": ..., "content": ...}, ...]}`."""
  conversations = []
  for line_no, record in _jsonl_records(path):
    where = f"{path}:{line_no}"
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
      raise DataFormatError(f"{where}: expected a non-empty list in field 'messages'")
    conversation = []
    for k, m in enumerate(messages):
      if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
        raise DataFormatError(f"{where}: messages[{k}] needs string fields 'role' and 'content'")
      if m["role"] not in CHAT_ROLES:
        raise DataFormatError(f"{where}: messages[{k}] has unknown role {m['role']!r} (expected one of {CHAT_ROLES})")
      conversation.append(Message(m["role"], m["content"]))
    if not any(m.role == "assistant" for m in conversation):
      raise DataFormatError(f"{where}: no assistant message, so nothing to train on")
    conversations.append(conversation)
  return conversations
