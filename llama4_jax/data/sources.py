"""Reading raw documents: plain text files, JSONL with a text field, chat JSONL for SFT.

Every reader returns plain Python data (strings, message lists); tokenisation happens in
`pipeline.py`. Malformed input fails with the file and line in the message, and so does a file that is
missing, empty, binary (a NUL byte) or not UTF-8.
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
    text = "".join(_text_lines(path))
    if not text.strip():
      raise DataFormatError(f"{path}: empty data file (no text)")
    pieces = [text] if separator is None else text.split(separator)
    docs.extend(p for p in pieces if p.strip())
  return docs


def _text_lines(path: str | Path) -> Iterator[str]:
  """The lines of a UTF-8 text file; DataFormatError naming the file (and line) when it is missing, not a
  file, binary (a NUL byte) or not UTF-8."""
  try:
    f = open(path, "rb")
  except FileNotFoundError:
    raise DataFormatError(f"{path}: no such data file") from None
  except OSError as e:
    raise DataFormatError(f"{path}: cannot read the data file ({e.strerror})") from None
  with f:
    head = f.read(8192)
    nul = head.find(b"\0")
    if nul >= 0:
      raise DataFormatError(f"{path}: binary data (a NUL byte at offset {nul}); expected UTF-8 text")
    f.seek(0)
    for line_no, raw in enumerate(f, 1):
      if b"\0" in raw:
        raise DataFormatError(f"{path}:{line_no}: binary data (a NUL byte); expected UTF-8 text")
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}:{line_no}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                              f"{e.start + 1})") from None
      yield text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text mode reads them


def _jsonl_records(path: str | Path) -> Iterator[tuple[int, dict]]:
  """(line number, object) for every non-blank line of a JSONL file; a file without one is refused."""
  n = 0
  for line_no, line in enumerate(_text_lines(path), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataFormatError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
      raise DataFormatError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
    n += 1
    yield line_no, record
  if not n:
    raise DataFormatError(f"{path}: empty data file (no JSON lines)")


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
