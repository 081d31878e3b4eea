#!/usr/bin/env python
"""CPM-Bee end to end with the Hugging Face classes: save, reload, answer a structured prompt.

    python examples/cpmbee_demo.py                      # a tiny random CPM-Bee: build, save, reload, generate
    python examples/cpmbee_demo.py --model cpmbee-10b-hf --dtype float16 --device cuda   # a converted model

With no ``--model`` it builds a tiny CPM-Bee with random weights (the real 86,583-token vocabulary,
a narrow width), saves it with its tokenizer to ``--output-dir`` (default ``build/tiny-cpmbee``),
loads that folder back with ``AutoModelForCausalLM`` / ``AutoTokenizer`` and generates. The
weights are random, so the answer is gibberish: what the demo shows is that the path works.

``--model PATH`` loads a folder written by ``conversion/convert_cpmbee.py`` instead.
Errors are one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_INPUT = "今天天气不错，我们去公园散步吧。"
DEFAULT_QUESTION = "我们要去哪里？"


class DemoError(Exception):
    """A problem to report in one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="CPM-Bee with transformers: build or load, then generate.")
    parser.add_argument("--model", help="a converted CPM-Bee folder; default: build a tiny random one")
    parser.add_argument(
        "--output-dir", default="build/tiny-cpmbee", help="where the tiny random model is saved (default: %(default)s)"
    )
    parser.add_argument("--vocab-file", help="CPM-Bee vocabulary (bee.txt); default: the installed original package's")
    parser.add_argument(
        "--prompt",
        default=DEFAULT_INPUT,
        help="the text of the 'input' field, or a whole CPM-Bee dict as JSON (with an '<ans>' key)",
    )
    parser.add_argument("--question", default=DEFAULT_QUESTION, help="the 'question' field (ignored for a JSON prompt)")
    parser.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                        help="dtype to run in (default: as saved; float32 for the tiny model)")
    parser.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="default: %(default)s")
    parser.add_argument("--num-beams", type=int, default=1, help="default: %(default)s (greedy)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny model's random weights")
    return parser


def make_prompt(prompt: str, question: str) -> dict:
    if prompt.lstrip().startswith("{"):
        try:
            data = json.loads(prompt)
        except json.JSONDecodeError as error:
            raise DemoError(f"--prompt looks like JSON but is not valid JSON ({error})") from None
        if not isinstance(data, dict) or "<ans>" not in data:
            raise DemoError('a JSON --prompt must be an object with an "<ans>" key, e.g. {"input": "...", "<ans>": ""}')
        return data
    from viscpm import CpmBeeTokenizer

    # Plain text is escaped, so that a "<" in it stays text instead of opening a special token.
    return {"input": CpmBeeTokenizer.escape(prompt), "question": CpmBeeTokenizer.escape(question), "<ans>": ""}


def find_vocab(vocab_file: str | None) -> str:
    from viscpm.conversion.common import default_vocab_file

    vocab = vocab_file or default_vocab_file()
    if vocab is None:
        raise DemoError(
            "no CPM-Bee vocabulary: pass --vocab-file bee.txt, or install the original package "
            "(pip install --no-deps VisCPM==0.0.1.dev0), which ships it"
        )
    if not Path(vocab).is_file():
        raise DemoError(f"vocabulary {vocab} not found")
    return vocab


def build_tiny_model(output_dir: str, vocab_file: str, seed: int) -> Path:
    """Save a tiny random CPM-Bee with the real vocabulary and its tokenizer; return the folder."""
    import torch

    from viscpm import CpmBeeConfig, CpmBeeForCausalLM, CpmBeeTokenizer
    from viscpm.conversion.common import ConversionError, atomic_output_dir

    output = Path(output_dir)
    config_file = output / "config.json"
    occupied = any(output.iterdir()) if output.is_dir() else output.exists()
    if occupied:
        # Replace only a folder this demo made before, never someone's other files.
        try:
            ours = json.loads(config_file.read_text(encoding="utf-8")).get("model_type") == "cpmbee"
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise DemoError(f"{output} exists and is not a CPM-Bee folder; pick another --output-dir")

    tokenizer = CpmBeeTokenizer(vocab_file)
    config = CpmBeeConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=16,
        intermediate_size=128,
        position_bias_num_buckets=32,
        position_bias_num_segment_buckets=32,
        position_bias_max_distance=128,
        rotary_dtype="float32",
    )
    torch.manual_seed(seed)
    model = CpmBeeForCausalLM(config).eval()
    try:
        with atomic_output_dir(output, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except ConversionError as error:
        raise DemoError(str(error)) from None
    params = sum(p.numel() for p in model.parameters())
    print(f"built a tiny CPM-Bee with random weights ({params / 1e6:.1f}M parameters) and saved it to {output}")
    return output


def run(model_dir: Path, data: dict, dtype: str, device: str | None, max_new_tokens: int, num_beams: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import viscpm  # noqa: F401  (registers CPM-Bee with the Auto classes)

    if not (model_dir / "config.json").is_file():
        raise DemoError(
            f"{model_dir} is not a model folder (no config.json); convert a checkpoint with "
            "conversion/convert_cpmbee.py first"
        )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch_device = torch.device(device)
    except RuntimeError:
        raise DemoError(f"unknown device {device!r}") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise DemoError("--device cuda asked for, but no CUDA GPU is available here")

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(torch_device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    print(f"loaded {type(model).__name__} ({model.dtype}, {torch_device}) in {time.perf_counter() - start:.1f}s")

    inputs = tokenizer(data, return_tensors="pt").to(torch_device)
    prompt_length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
    return tokenizer.decode_answers(data, out[:, prompt_length:])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    if args.max_new_tokens < 1:
        print("error: --max-new-tokens must be at least 1", file=sys.stderr)
        return 2
    try:
        data = make_prompt(args.prompt, args.question)
        if args.model:
            model_dir = Path(args.model)
        else:
            model_dir = build_tiny_model(args.output_dir, find_vocab(args.vocab_file), args.seed)
        answer = run(model_dir, data, args.dtype, args.device, args.max_new_tokens, args.num_beams)
    except DemoError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except ImportError as error:
        print(f"error: {error}; install the package with `pip install -e .`", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"error: {type(error).__name__}: {message}", file=sys.stderr)
        return 1

    print("prompt (CPM-Bee text, '<' escaped as '<<'): " + json.dumps(data, ensure_ascii=False))
    print("answer: " + json.dumps(answer.get("<ans>"), ensure_ascii=False))
    if not args.model:
        print("note: the weights are random, so the answer is gibberish; "
              "run --model PATH with a converted checkpoint for real text")
    return 0


if __name__ == "__main__":
    sys.exit(main())
