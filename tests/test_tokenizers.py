"""Tokenizers: the real Llama 4 tiktoken BPE (offline), HF tokenizer.json, byte-level BPE training."""

import pytest

from llama4_jax.data import llama4_tiktoken
from llama4_jax.data.hf_tokenizer import BPE_SPECIAL_TOKENS, HFTokenizer, train_bpe, train_bpe_files
from llama4_jax.data.tokenizers import Tokenizer, load_tokenizer

SAMPLE = "To be, or not to be: that is the question.\n\n  Naïve café, 日本語, emoji 🎭!\tTabs\r\nand <|eot|> as text."

# Reference 2.8 (llama-models tokenizer.py).
LLAMA4_IDS = {
    "<|begin_of_text|>": 200000,
    "<|end_of_text|>": 200001,
    "<|header_start|>": 200005,
    "<|header_end|>": 200006,
    "<|eom|>": 200007,
    "<|eot|>": 200008,
    "<|finetune_right_pad|>": 200018,
    "<|image_start|>": 200080,
    "<|image_end|>": 200081,
    "<|tile_x_separator|>": 200084,
    "<|tile_y_separator|>": 200085,
    "<|image|>": 200090,
    "<|patch|>": 200092,
}


@pytest.fixture(scope="module")
def llama4():
  return load_tokenizer("llama4")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
  corpus = [SAMPLE * 3, "The quick brown fox jumps over the lazy dog. " * 50, "Alas, poor Yorick!\n" * 20]
  path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
  train_bpe(corpus, vocab_size=400, path=path)
  return path


def test_llama4_special_ids(llama4):
  assert isinstance(llama4, Tokenizer)
  assert llama4.vocab_size == 202048
  assert (llama4.bos_id, llama4.pad_id, llama4.eos_ids) == (200000, 200018, (200001, 200007, 200008))
  for token, token_id in LLAMA4_IDS.items():
    assert llama4.token_id(token) == token_id
  assert llama4.token_id("<|reserved_special_token_0|>") == 200000 + 1144
  with pytest.raises(ValueError, match="not_a_token"):
    llama4.token_id("<|not_a_token|>")


def test_llama4_round_trip(llama4):
  ids = llama4.encode(SAMPLE, bos=True, eos=True)
  assert ids[0] == 200000 and ids[-1] == 200001
  assert 200008 not in ids  # special-token text is plain text
  assert max(ids[1:-1]) < 200000
  assert llama4.decode(ids[1:-1]) == SAMPLE


def test_llama4_matches_meta_tokenizer(llama4):
  from llama_models.llama4.tokenizer import Tokenizer as MetaTokenizer

  meta = MetaTokenizer(llama4_tiktoken.bundled_model_path())
  assert llama4.encode(SAMPLE, bos=True, eos=True) == meta.encode(SAMPLE, bos=True, eos=True)
  assert meta.special_tokens == {t: llama4.token_id(t) for t in meta.special_tokens}


def test_llama4_long_text_pieces():
  text = "a" * 60_000 + " " * 30_000 + "word " * 100_000 + "end"
  pieces = list(llama4_tiktoken._pieces(text))
  assert "".join(pieces) == text
  assert max(map(len, pieces)) <= 400_000
  assert all(len(run) <= 25_000 for p in pieces for run in p.split())
  assert list(llama4_tiktoken._pieces("short text")) == ["short text"]


def test_bpe_round_trip_and_specials(bpe):
  tok = HFTokenizer.from_file(bpe)
  assert 256 + len(BPE_SPECIAL_TOKENS) < tok.vocab_size <= 400  # the small corpus may run out of merges
  assert [tok.token_id(t) for t in BPE_SPECIAL_TOKENS] == list(range(len(BPE_SPECIAL_TOKENS)))
  assert (tok.bos_id, tok.pad_id) == (0, 2)
  assert tok.eos_ids == tuple(tok.token_id(t) for t in ("<|end_of_text|>", "<|eom|>", "<|eot|>"))
  unseen = "Zebras & ümlauts ∑ 🎭 \n\n\n   x"
  for text in (SAMPLE, unseen, "", " "):
    assert tok.decode(tok.encode(text)) == text
  ids = tok.encode(SAMPLE, bos=True, eos=True)
  assert ids[0] == tok.bos_id and ids[-1] == tok.token_id("<|end_of_text|>")
  assert tok.token_id("<|eot|>") not in ids[1:-1]
  with pytest.raises(ValueError, match="image"):
    tok.token_id("<|image|>")


def test_bpe_train_files_matches_texts(tmp_path):
  texts = ["Now is the winter of our discontent\n" * 30, "Made glorious summer by this sun of York;\n" * 30]
  files = []
  for i, text in enumerate(texts):
    files.append(tmp_path / f"doc{i}.txt")
    files[-1].write_text(text, encoding="utf-8")
  a = train_bpe_files(files, vocab_size=300, path=tmp_path / "a" / "tokenizer.json")
  b = train_bpe(texts, vocab_size=300)
  assert a.encode(texts[0]) == b.encode(texts[0])
  assert (tmp_path / "a" / "tokenizer.json").is_file()
  with pytest.raises(ValueError, match="vocab_size"):
    train_bpe(texts, vocab_size=100)


def test_load_tokenizer_dispatch(bpe, tmp_path):
  assert isinstance(load_tokenizer(bpe), HFTokenizer)
  assert isinstance(load_tokenizer(bpe.parent), HFTokenizer)
  assert isinstance(load_tokenizer(llama4_tiktoken.bundled_model_path()), llama4_tiktoken.Llama4Tokenizer)
  with pytest.raises(FileNotFoundError, match="missing.json"):
    load_tokenizer(tmp_path / "missing.json")
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    load_tokenizer(tmp_path)
