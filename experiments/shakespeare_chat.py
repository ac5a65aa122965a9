"""A small chat set from the plays: each pair of consecutive speeches of a scene by two different speakers is
one conversation, the first speech as the user turn and the reply as the assistant turn (both as
"SPEAKER: text"). Train pairs from the train works, validation pairs from the held-out works
(`llama4_jax.data.shakespeare.split_works`), written as chat JSONL (`data.source=chat`).

  python -m experiments.shakespeare_chat [--root data/shakespeare] [--out data/shakespeare_chat] [--val-every 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from llama4_jax.data import shakespeare

_SPEAKER = re.compile(r"^([A-Z][A-Z' \-]*[A-Z])\.(?:\s+(.*))?$")  # "FIRST GENTLEMAN." or "HAMLET. Some text"


def speeches(text: str) -> list[tuple[str, str] | None]:
  """(speaker, speech) for every speech of a work in order; None where a scene changes or someone enters
  or leaves (a stage direction block), so no pair spans one."""
  out: list[tuple[str, str] | None] = []
  for block in re.split(r"\n\s*\n", text):
    lines = [ln.strip() for ln in block.strip().splitlines() if ln.strip()]
    if not lines:
      continue
    m = _SPEAKER.match(lines[0])
    if not m:
      out.append(None)
      continue
    body = ([m.group(2)] if m.group(2) else []) + lines[1:]
    body = [ln for ln in body if not (ln.startswith("[") and ln.endswith("]"))]
    if body:
      out.append((m.group(1), " ".join(body)))
  return out


def pairs(text: str, max_chars: int = 400) -> list[dict]:
  """Chat records of the consecutive speech pairs of one work (speeches longer than `max_chars` skipped)."""
  s = speeches(text)
  records = []
  for a, b in zip(s, s[1:]):
    if a and b and a[0] != b[0] and len(a[1]) <= max_chars and len(b[1]) <= max_chars:
      records.append({"messages": [{"role": "user", "content": f"{a[0]}: {a[1]}"},
                                   {"role": "assistant", "content": f"{b[0]}: {b[1]}"}]})
  return records


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--root", default="data/shakespeare", help="the unpacked corpus (make train fetches it)")
  ap.add_argument("--out", default="data/shakespeare_chat", help="writes train.jsonl and val.jsonl here")
  ap.add_argument("--val-every", type=int, default=3, help="keep every n-th validation pair (a quick evaluation)")
  args = ap.parse_args(argv)
  train, val = shakespeare.split_works(shakespeare.load_works(args.root))
  os.makedirs(args.out, exist_ok=True)
  for name, works in (("train", train), ("val", val)):
    records = [r for w in works for r in pairs(w.text)]
    records = records[:: args.val_every] if name == "val" else records
    with open(os.path.join(args.out, f"{name}.jsonl"), "w") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")
    print(f"{args.out}/{name}.jsonl: {len(records)} conversations from {len(works)} works")
  return 0


if __name__ == "__main__":
  sys.exit(main())
