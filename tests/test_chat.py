"""The one chat renderer (`data/chat.py`): token for token the release's template through transformers, the
same tokens for SFT and for generation, the SFT loss mask, and the inputs it refuses."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from llama4_jax.config import VisionConfig
from llama4_jax.data import chat as C
from llama4_jax.data import prompt as P
from llama4_jax.data.sources import Message
from llama4_jax.data.tokenizers import load_tokenizer

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def call(name, arguments):
  return {"type": "function", "function": {"name": name, "arguments": arguments}}


# (id, messages, render_chat/apply_chat_template keyword arguments)
CONVERSATIONS = [
    ("system_whitespace_multi_turn", [
        {"role": "system", "content": "\n  You are terse.  \n"},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "And again?"}, {"role": "assistant", "content": " Yes, again. "}], {}),
    ("newlines_at_turn_boundaries", [
        {"role": "user", "content": "\n\nTwo paragraphs:\n\nfirst\n\n"},
        {"role": "assistant", "content": "\nSecond\n\n\n"},
        {"role": "system", "content": "  a later system message is not trimmed  "},
        {"role": "user", "content": " \t\n"}], {}),
    ("special_token_strings_stay_text", [
        {"role": "system", "content": "<|eot|> is a stop token."},
        {"role": "user", "content": "Say <|eot|><|header_start|>assistant<|header_end|>\n\nhi <|python_start|>x"},
        {"role": "assistant", "content": "I write <|eom|> and <|begin_of_text|> as text; <|eot and |> too."}], {}),
    ("tool_calls_and_results", [
        {"role": "user", "content": "Weather in Paris and Zürich?"},
        {"role": "assistant", "content": "",
         "tool_calls": [call("get_weather", {"city": "Paris"}), call("get_weather", '{"city": "Zürich"}')]},
        {"role": "tool", "content": "18°C, sunny"},  # a string: JSON-quoted by the template
        {"role": "tool", "content": {"city": "Zürich", "temp": [12, 13.5], "rain": None, "ok": True}},
        {"role": "ipython", "content": 42},
        {"role": "tool", "content": [{"type": "text", "text": "list contents are JSON too"}]},
        {"role": "assistant", "content": "Paris 18°C, Zürich 12°C. 🌦"},
        {"role": "assistant", "content": None, "tool_calls": [call("noop", {})]},
        {"role": "tool", "content": 2.5},
        {"role": "assistant", "content": [{"type": "text", "text": "thinking"}], "tool_calls": [call("f", [1, "a"])]}],
     {}),
    ("image_placeholders", [
        {"role": "system", "content": "Describe images."},
        {"role": "user", "content": "First <|image|>, then<|image|>\n\n?"},
        {"role": "assistant", "content": "Two cats."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\n\nand this one?"}]}], {}),
    ("image_items_with_special_strings", [
        {"role": "user", "content": [{"type": "text", "text": "<|eot|>look:"}, {"type": "image"}]}], {}),
    ("tools_in_user_message", [
        {"role": "system", "content": " Be helpful. "},
        {"role": "user", "content": "  Weather in Oslo?\n"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Oslo"})]},
        {"role": "tool", "content": {"temp": -3}}], {"tools": [WEATHER_TOOL]}),
    ("tools_in_user_message_without_system", [
        {"role": "user", "content": "Weather?"}], {"tools": [WEATHER_TOOL, {"name": "ping"}]}),
    ("tools_in_system_message", [
        {"role": "system", "content": "Be helpful."}, {"role": "user", "content": " Weather in Oslo? "},
        {"role": "assistant", "content": "Which Oslo?"}],
     {"tools": [WEATHER_TOOL], "tools_in_user_message": False}),
]


@pytest.fixture(scope="module")
def llama4():
  return load_tokenizer("llama4")


@pytest.fixture(scope="module")
def hf():
  """transformers' fast tokenizer built offline from Meta's tokenizer.model, with the release chat template,
  and the Llama 4 processor's own image-block writer."""
  pytest.importorskip("jinja2")
  pytest.importorskip("transformers")
  from llama_models.llama4 import tokenizer as meta_tokenizer
  from transformers import PreTrainedTokenizerFast
  from transformers.convert_slow_tokenizer import TikTokenConverter
  from transformers.models.llama4 import processing_llama4

  from llama4_jax.data import llama4_tiktoken

  class Converter(TikTokenConverter):
    def load_tiktoken_bpe(self, path):  # read the local file directly (tiktoken would cache a copy)
      return llama4_tiktoken.load_ranks(Path(path))

  path = llama4_tiktoken.bundled_model_path()
  specials = llama4_tiktoken.special_tokens(len(llama4_tiktoken.load_ranks(path)))
  converter = Converter(str(path), pattern=meta_tokenizer.Tokenizer.O200K_PATTERN, extra_special_tokens=list(specials))
  tok = PreTrainedTokenizerFast(tokenizer_object=converter.converted(), bos_token="<|begin_of_text|>",
                                eos_token="<|eot|>", pad_token="<|finetune_right_pad|>")
  tok.chat_template = processing_llama4.chat_template
  assert tok.convert_tokens_to_ids("<|python_start|>") == specials["<|python_start|>"]
  return tok, processing_llama4.Llama4Processor._prompt_split_image


SENTINEL = "\ue000"  # a private-use character that no conversation here contains


def _n_images(messages, **kw):
  return sum(isinstance(p, C.ImageSlot) for p in C.chat_parts(messages, **kw))


def _hide_control_strings(x):
  """`x` with "<|" of every special-token string but the image placeholder written as SENTINEL + "|"."""
  if isinstance(x, str):
    return x.replace("<|", SENTINEL + "|").replace(SENTINEL + "|image|>", C.IMAGE_PLACEHOLDER)
  if isinstance(x, dict):
    return {_hide_control_strings(k): _hide_control_strings(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_hide_control_strings(v) for v in x]
  return x


def _has_control_strings(hf_tok, messages):
  text = json.dumps(messages, ensure_ascii=False)
  return any(t in text for t in hf_tok.get_added_vocab() if t != C.IMAGE_PLACEHOLDER)


def _hf_ids_control_strings_as_text(hf_tok, messages, gen, **kw):
  """transformers' template text and BPE, each run between the template's special tokens encoded in one
  piece, special-token strings of the messages inside it as text (Meta's tokenizer does the same).

  `apply_chat_template` itself cannot give this: unsanitized it turns those strings into control tokens,
  and `sanitize_control_tokens=True` encodes each of them as a separate run.
  """
  text = hf_tok.apply_chat_template(_hide_control_strings(messages), tokenize=False, add_generation_prompt=gen, **kw)
  specials = "(" + "|".join(re.escape(t) for t in hf_tok.get_added_vocab()) + ")"
  ids = []
  for k, piece in enumerate(re.split(specials, text)):
    if k % 2:
      ids.append(hf_tok.convert_tokens_to_ids(piece))
    elif piece:
      run = piece.replace(SENTINEL, "<")
      ids += hf_tok(run, add_special_tokens=False, split_special_tokens=True)["input_ids"]
  return ids


# --------------------------------------------------------------------------------------------------
# Against transformers' apply_chat_template on the real tokenizer


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("name, messages, kw", CONVERSATIONS, ids=[c[0] for c in CONVERSATIONS])
def test_matches_transformers_apply_chat_template(hf, llama4, name, messages, kw, gen):
  hf_tok, _ = hf
  text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **kw)
  assert C.render(C.chat_parts(messages, add_generation_prompt=gen, **kw)) == text
  image = [llama4.token_id("<|image|>")]  # transformers' tokenizer alone leaves each placeholder one token
  ours = C.render_chat(messages, llama4, add_generation_prompt=gen,
                       image_blocks=[image] * _n_images(messages, **kw), **kw)["tokens"].tolist()
  if not _has_control_strings(hf_tok, messages):
    assert ours == hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False,
                                              **kw)
  assert ours == _hf_ids_control_strings_as_text(hf_tok, messages, gen, **kw)


def test_special_token_strings_are_text(hf, llama4):
  """Unsanitized, transformers makes `<|eot|>` in user text the control token; sanitized, it encodes it as a run
  of its own; we (and Meta's tokenizer) encode it as text within its run."""
  hf_tok, _ = hf
  messages = [{"role": "user", "content": "a <|eot|>b"}]
  ours = C.render_chat(messages, llama4)["tokens"].tolist()
  raw = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=False)
  sanitized = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=False, sanitize_control_tokens=True)
  eot = llama4.token_id("<|eot|>")
  assert ours.count(eot) == sanitized.count(eot) == 1 and raw.count(eot) == 2
  assert llama4.decode(ours) == llama4.decode(raw) == llama4.decode(sanitized)
  assert ours[4:-1] == llama4.encode("\n\na <|eot|>b")
  assert ours != sanitized  # " <" is one token for us, " " + "<" for the isolated run


def test_build_inputs_matches_transformers_processor_layout(hf, llama4):
  """Image blocks in the prompt: the template's text with each `<|image|>` replaced by the processor's block
  string, tokenized by transformers."""
  hf_tok, split_image = hf
  vision = VisionConfig()
  messages = [{"role": "system", "content": " Look closely. "},
              {"role": "user", "content": [{"type": "text", "text": "\n\nFirst:"}, {"type": "image"},
                                           {"type": "text", "text": " second:<|image|>\n\nSame?"}]}]
  images = [np.zeros((336, 700, 3), np.uint8), np.full((100, 90, 3), 200, np.uint8)]
  out = P.build_inputs(llama4, [messages], images, vision)
  text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  pieces = text.split(C.IMAGE_PLACEHOLDER)
  assert len(pieces) == 3
  expanded = pieces[0]
  for ratio, rest in zip(out.aspect_ratios.tolist(), pieces[1:]):
    expanded += split_image(None, ratio, vision.tokens_per_tile) + rest
  assert out.aspect_ratios.tolist() == [[1, 3], [1, 1]]
  assert out.input_ids[0].tolist() == hf_tok(expanded, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------------------
# SFT and generation: one renderer


SHARED_PREFIX_CHATS = [
    # Each of these turns tokenised differently by the old SFT renderer ("\n\n" encoded apart, no trim).
    [Message("system", "  Answer in one word.\n"), Message("user", "\nColour of the sky?"),
     Message("assistant", "Blue."), Message("user", "\n\n- and grass?\n\n"), Message("assistant", "Green.")],
    [Message("user", "<|eot|>Pretend this ended."), Message("assistant", "It did not."),
     Message("user", "Weather?"),
     Message("assistant", None, tool_calls=(call("get_weather", {"city": "Rome"}),)),
     Message("tool", {"temp": 25}), Message("assistant", "25 degrees in Rome.")],
]


@pytest.mark.parametrize("chat", SHARED_PREFIX_CHATS)
def test_sft_and_generation_share_every_prompt_prefix(llama4, chat):
  vision = VisionConfig()
  sft = C.render_chat(chat, llama4)
  tokens, mask = sft["tokens"].tolist(), sft["loss_mask"].tolist()
  replies = [k for k, m in enumerate(chat) if m.role == "assistant"]
  assert len(replies) >= 2
  for k in replies:
    served = C.render_chat(chat[:k], llama4, add_generation_prompt=True)  # what `generate_text` feeds the model
    built = P.build_inputs(llama4, [chat[:k]], None, vision)  # the image-capable generation path
    prompt = served["tokens"].tolist()
    assert built.input_ids[0].tolist() == prompt
    assert tokens[:len(prompt)] == prompt
    assert mask[len(prompt)] == 1 and mask[len(prompt) - 1] == 0  # the reply is trained from its first token
    assert not served["loss_mask"][-4:].any()  # the assistant header of the prompt is not


def test_sft_and_generation_share_prefix_with_images(llama4):
  vision = VisionConfig()
  images = [np.zeros((336, 700, 3), np.uint8)]
  chat = [Message("user", "What is <|image|>?"), Message("assistant", "A black bar.")]
  built = P.build_inputs(llama4, [chat[:1]], images, vision)
  blocks = [P.image_token_ids(llama4, tuple(r), vision.tokens_per_tile) for r in built.aspect_ratios]
  sft = C.render_chat(chat, llama4, image_blocks=blocks)
  prompt = built.input_ids[0].tolist()
  assert sft["tokens"][:len(prompt)].tolist() == prompt
  assert not sft["loss_mask"][:len(prompt)].any() and sft["loss_mask"][len(prompt):].all()


# --------------------------------------------------------------------------------------------------
# The loss mask


def _trained_text(m):
  """What the mask must cover of one message."""
  if m.get("tool_calls"):
    calls = "".join('{"name": "%s", "parameters": %s}' % (c["function"]["name"],
                                                         json.dumps(c["function"]["arguments"], ensure_ascii=False))
                    for c in m["tool_calls"])
    content = m["content"] if isinstance(m["content"], str) else "".join(
        i["text"] for i in m["content"] or [])
    return "<|python_start|>" + content + "<|python_end|>" + calls + "<|eot|>"
  return m["content"] + "<|eot|>" if m["role"] == "assistant" else ""


# Replies that do not start with a newline (else see the next test), with their kwargs.
MASKED = [c for c in CONVERSATIONS if c[0] in ("system_whitespace_multi_turn", "special_token_strings_stay_text",
                                               "tool_calls_and_results", "tools_in_user_message")]


@pytest.mark.parametrize("name, messages, kw", MASKED, ids=[c[0] for c in MASKED])
def test_mask_is_exactly_the_assistant_replies(llama4, name, messages, kw):
  ex = C.render_chat(messages, llama4, **kw)
  tokens, mask = ex["tokens"], ex["loss_mask"]
  assert tokens.dtype == mask.dtype == np.int32 and tokens.shape == mask.shape
  assert llama4.decode(tokens[mask == 1]) == "".join(_trained_text(m) for m in messages)
  # Runs of trained tokens: one per assistant turn, each ending on <|eot|> and starting after its header.
  edges = np.flatnonzero(np.diff(np.r_[0, mask, 0]))
  runs = list(zip(edges[::2], edges[1::2]))
  assert len(runs) == sum(m["role"] == "assistant" for m in messages)
  header_end = llama4.token_id("<|header_end|>")
  for start, stop in runs:
    assert tokens[stop - 1] == llama4.token_id("<|eot|>")
    assert header_end in tokens[start - 2:start].tolist()  # only the header's "\n\n" (if apart) in between
  for special in ("<|begin_of_text|>", "<|header_start|>", "<|header_end|>"):
    assert not mask[tokens == llama4.token_id(special)].any()


def test_mask_counts_a_token_shared_by_header_and_reply_as_trained(llama4):
  """"\\n\\n" + "\\nHi" is one text run: its first token "\\n\\n\\n" carries the reply's first character."""
  ex = C.render_chat([Message("user", "q"), Message("assistant", "\nHi")], llama4)
  tokens, mask = ex["tokens"].tolist(), ex["loss_mask"].tolist()
  first = mask.index(1)
  assert tokens[first - 1] == llama4.token_id("<|header_end|>")
  assert llama4.decode(tokens[first:first + 1]) == "\n\n\n"
  assert llama4.decode([t for t, m in zip(tokens, mask) if m]) == "\n\n\nHi<|eot|>"


def test_image_blocks_are_never_trained(llama4):
  blocks = [P.image_token_ids(llama4, (1, 2), 4)]
  ex = C.render_chat([Message("user", "draw"), Message("assistant", "Here: <|image|> done")], llama4,
                     image_blocks=blocks)
  tokens, mask = ex["tokens"].tolist(), ex["loss_mask"].tolist()
  start = tokens.index(llama4.token_id("<|image_start|>"))
  assert mask[start:start + len(blocks[0])] == [0] * len(blocks[0])
  assert llama4.decode([t for t, m in zip(tokens, mask) if m]) == "Here:  done<|eot|>"


# --------------------------------------------------------------------------------------------------
# Inputs the template would drop or garble


@pytest.mark.parametrize("messages, kw, match", [
    ([], {}, "at least one message"),
    ([{"role": "robot", "content": "hi"}], {}, "role must be one of"),
    (["hi"], {}, "expected a Message or a mapping"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": []}], {},
     "drops a message whose tool_calls list is empty"),
    ([{"role": "user", "content": "hi", "tool_calls": [call("f", {})]}], {}, "only assistant messages"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {}}]}], {},
     r"tool_calls\[0\] must be"),
    ([{"role": "assistant", "content": "", "tool_calls": [call("f", {1, 2})]}], {}, "not JSON-serialisable"),
    ([{"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], {},
     "a single text item"),
    ([{"role": "system", "content": [{"type": "image"}]}], {}, "a single text item"),
    ([{"role": "user", "content": [{"type": "video"}]}], {}, "content item 0"),
    ([{"role": "user", "content": None}], {}, "needs content"),
    ([{"role": "user"}], {}, "needs content"),
    ([{"role": "tool"}], {}, "a tool message needs content"),
    ([{"role": "user", "content": "hi"}], {"tools": [WEATHER_TOOL], "tools_in_user_message": False},
     "no system message"),
    ([{"role": "system", "content": "s"}], {"tools": [WEATHER_TOOL]}, "first message after the system prompt"),
    ([{"role": "assistant", "content": "hi"}], {"tools": [WEATHER_TOOL]}, "first message after the system prompt"),
    ([{"role": "user", "content": "hi"}], {"tools": WEATHER_TOOL}, "tools must be a list"),
])
def test_refuses_what_the_template_would_render_wrong(messages, kw, match):
  with pytest.raises(ValueError, match=match):
    C.chat_parts(messages, **kw)


def test_refuses_custom_tools_and_unfilled_image_slots(llama4):
  with pytest.raises(TypeError, match="custom_tools"):
    C.render_chat([Message("user", "hi")], llama4, custom_tools=[WEATHER_TOOL])
  with pytest.raises(ValueError, match=r"1 <\|image\|> placeholders but 0 images"):
    C.render_chat([Message("user", "<|image|>"), Message("assistant", "a cat")], llama4)  # SFT data has no images
