"""Generate text from a model, streaming it as it comes.

  python -m experiments.generate --checkpoint runs/shakespeare_cpu --prompt "ROMEO:" --max-new-tokens 200
  python -m experiments.generate --hf /models/Llama-4-Scout-17B-16E-Instruct --prompt "Describe this." \\
      --image photo.png --temperature 0.6 --top-p 0.9
  python -m experiments.generate --checkpoint DIR --prompt "One" --prompt "Two"      # a left-padded batch
  python -m experiments.generate --hf DIR --prompt-file book.txt --prefill-chunk 32768   # a long prompt
  python -m experiments.generate --hf DIR --prompt-file book.txt --kv-cache int8   # half the KV memory of bf16

--checkpoint: anything `llama4_jax.load` reads (a training run directory, its checkpoints/ or one step, a
converted model directory, a HF release directory); --hf: the same, for a HF release directory.
--tokenizer overrides the tokenizer found with the model.
Chat format (`--chat auto`): on with the Llama 4 tokenizer or with images, off otherwise (raw text after
bos). Images are marked in the prompt by `<|image|>`; without a marker they go before the text.
Greedy by default; the instruct release's generation_config uses --temperature 0.6 --top-p 0.9.
Stops at the tokenizer's eos ids (Llama 4: <|end_of_text|>, <|eom|>, <|eot|>).
--kv-cache int8 holds the KV cache as int8 with a float32 scale per token and kv head (`model.cache.Int8KV`);
the default keeps it in the compute dtype.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--checkpoint", help="Orbax checkpoint or training run directory")
  src.add_argument("--hf", help="HF release-format model directory")
  ap.add_argument("--tokenizer", help="tokenizer spec: 'llama4', a tokenizer.json / tokenizer.model, or a directory")
  ap.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
  ap.add_argument("--prompt-file", action="append", default=[], help="a file whose text is one prompt (repeatable)")
  ap.add_argument("--prefill-chunk", type=int, help="prefill long prompts in slices of this many tokens")
  ap.add_argument("--image", action="append", default=[], help="image file (repeat for several, in prompt order)")
  ap.add_argument("--system", help="system message (chat format)")
  ap.add_argument("--chat", choices=("auto", "on", "off"), default="auto")
  ap.add_argument("--max-new-tokens", type=int, default=128)
  ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  ap.add_argument("--top-k", type=int, default=0)
  ap.add_argument("--top-p", type=float, default=1.0)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), help="parameters and compute (default: as stored)")
  ap.add_argument("--kv-cache", choices=("float32", "bfloat16", "int8"),
                  help="KV cache dtype (default: the compute dtype); int8: per-token-per-head scales")
  args = ap.parse_args(argv)
  for path in args.prompt_file:
    try:
      with open(path, encoding="utf-8") as f:
        args.prompt.append(f.read())
    except (OSError, UnicodeDecodeError) as e:
      ap.error(f"--prompt-file {path}: {e}")
  if not args.prompt:
    ap.error("give at least one --prompt or --prompt-file")

  from PIL import Image

  from llama4_jax import load
  from llama4_jax.apps import generate as G
  from llama4_jax.data.prompt import IMAGE_PLACEHOLDER
  from llama4_jax.io.validate import CheckpointError

  try:
    loaded = load(args.checkpoint or args.hf, tokenizer=args.tokenizer, dtype=args.dtype)
  except CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if loaded.tokenizer is None:
    print("error: no tokenizer found with the checkpoint: pass --tokenizer", file=sys.stderr)
    return 2
  tok = loaded.tokenizer
  chat = {"on": True, "off": False}.get(args.chat, tok.vocab_size >= 200_000 or bool(args.image))
  prompts = list(args.prompt)
  if args.image and not any(IMAGE_PLACEHOLDER in p for p in prompts):
    if len(prompts) != 1:
      raise SystemExit("error: with several prompts, mark each image's place with <|image|>")
    prompts[0] = IMAGE_PLACEHOLDER * len(args.image) + prompts[0]
  if chat:
    prompts = [([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": p}]
               for p in prompts]
  images = [Image.open(p) for p in args.image] or None
  sampling = G.Sampling(args.temperature, args.top_k, args.top_p)
  print(f"[{loaded.description}; {'chat' if chat else 'raw text'}; {sampling}]", file=sys.stderr)

  single = len(prompts) == 1

  def show(row, piece):
    if single:
      sys.stdout.write(piece)
      sys.stdout.flush()

  t0 = time.perf_counter()
  outs = G.generate_text(loaded.model, tok, prompts, images, chat=chat, max_new_tokens=args.max_new_tokens,
                         sampling=sampling, seed=args.seed, on_text=show, prefill_chunk=args.prefill_chunk,
                         cache_dtype=args.kv_cache)
  dt = time.perf_counter() - t0
  if single:
    print()
  else:
    for i, o in enumerate(outs):
      print(f"--- [{i}] {args.prompt[i]!r}\n{o}")
  print(f"[{dt:.1f} s including compilation]", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
