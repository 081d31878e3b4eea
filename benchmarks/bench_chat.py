#!/usr/bin/env python
"""VisCPM-Chat latency of ours against the original, on one medium random-weight config (CPU, fp32).

One question about one image, ``--new-tokens`` answer tokens (the original's ``max_length``), timed end to
end: image encoding, prompt prefill and decoding.

* beam 3: the original `chat()` settings (temperature 0.7, repetition penalty 1.1, length penalty 3), the
  original's `VLLMCPMBeeBeamSearch.generate` against our `VisCPMChat.chat` (the same algorithm; the answers
  are compared);
* beam 1: the original's own loop with ``beam_size=1`` (its only way to decode one hypothesis) against ours
  with ``num_beams=1`` (the same algorithm; the answers are compared);
* greedy: that original beam-1 loop against transformers' greedy `generate()` on our model
  (``original_beam_search=False``; different algorithms, so only the time is compared).

``--decode-mode`` picks our beam search's decode step (``dynamic``, ``static``, ``compile``; see
`CpmBeeStaticDecoder`); each mode gets one untimed warm-up call (compilation) before the timed repeats.

The model is a tiny original `VLU_CPMBee` grown to the medium size, saved in the original checkpoint format
and converted with our converter. A measurement script, not a test: nothing asserts on timing.

    cd /work/main && python benchmarks/bench_chat.py [--new-tokens 64] [--repeats 3]
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
# Importing the original calls torch.set_num_threads(1): keep torch's default for both sides.
DEFAULT_THREADS = torch.get_num_threads()

VISION = dict(encoder_embed_dim=384, encoder_layers=6, encoder_attention_heads=6, encoder_ffn_embed_dim=1536,
              img_size=224, patch_size=16, vocab_size=100)
LLM = dict(dim_model=512, num_heads=8, dim_head=64, dim_ff=1280, num_layers=8, position_bias_num_buckets=256,
           position_bias_num_segment_buckets=256, position_bias_max_distance=2048)


def best_ms(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return result, min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-mode", default="dynamic", choices=["dynamic", "static", "compile", "cuda_graph"])
    args = parser.parse_args()

    from oracle import TINY_ORIGINAL_CONFIG, VOCAB_FILE, build_original_vlu, original_chat_generate
    from PIL import Image
    from VisCPM.utils.utils import build_transform

    from viscpm import VisCPMChat
    from viscpm.conversion.convert_viscpm_chat import convert_viscpm_chat_checkpoint

    torch.set_num_threads(DEFAULT_THREADS)
    vlu = build_original_vlu(seed=0, vision_overrides=VISION, **LLM)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(vlu.state_dict(), os.path.join(tmp, "chat.pt"))
        with open(os.path.join(tmp, "llm.json"), "w") as f:
            json.dump({**TINY_ORIGINAL_CONFIG, **LLM}, f)
        with open(os.path.join(tmp, "vision.json"), "w") as f:
            json.dump(VISION, f)
        convert_viscpm_chat_checkpoint(
            os.path.join(tmp, "chat.pt"), os.path.join(tmp, "hf"), llm_config=os.path.join(tmp, "llm.json"),
            vision_config=os.path.join(tmp, "vision.json"), vocab_file=VOCAB_FILE, progress=False,
        )
        chat = VisCPMChat.from_pretrained(os.path.join(tmp, "hf"), device="cpu", attn_implementation="sdpa")

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    pixels = build_transform(is_train=False, input_size=224)(image)
    question = "这张图片里有什么？请详细描述一下。"
    n = args.new_tokens
    beam = dict(beam_size=3, temperature=0.7, repetition_penalty=1.1, length_penalty=3.0, max_length=n)

    mode = args.decode_mode
    for beams in (3, 1):  # warm-up (and compilation) of the timed calls below
        chat.chat(image, question, num_beams=beams, original_max_length=n, decode_mode=mode)
    (answer_o, _), beam_o = best_ms(lambda: original_chat_generate(vlu, pixels, question, **beam), args.repeats)
    answer_u, beam_u = best_ms(lambda: chat.chat(image, question, original_max_length=n, decode_mode=mode).answer,
                               args.repeats)
    greedy = dict(beam, beam_size=1)
    (answer1_o, _), greedy_o = best_ms(lambda: original_chat_generate(vlu, pixels, question, **greedy), args.repeats)
    answer1_u, beam1_u = best_ms(
        lambda: chat.chat(image, question, num_beams=1, original_max_length=n, decode_mode=mode).answer,
        args.repeats)
    _, greedy_u = best_ms(
        lambda: chat.chat(image, question, num_beams=1, original_beam_search=False, do_sample=False,
                          repetition_penalty=1.0, max_new_tokens=n, min_new_tokens=n),
        args.repeats,
    )

    print(f"torch {torch.__version__} | {platform.machine()} | threads {torch.get_num_threads()} | "
          f"vision {VISION['encoder_embed_dim']}x{VISION['encoder_layers']} at 224/16, CPM-Bee "
          f"{LLM['dim_model']}x{LLM['num_layers']}, vocab 86583, fp32 | best of {args.repeats} | ours: sdpa, "
          f"decode_mode={mode}")
    header = f"{'decoding':>8} | {'original ms':>11} | {'ours ms':>9} | {'ratio o/u':>9} | {'answers':>8}"
    print(header)
    print("-" * len(header))
    print(f"{'beam 3':>8} | {beam_o:>11.0f} | {beam_u:>9.0f} | {beam_o / beam_u:>9.2f} | "
          f"{'same' if answer_o == answer_u else 'DIFFER':>8}")
    print(f"{'beam 1':>8} | {greedy_o:>11.0f} | {beam1_u:>9.0f} | {greedy_o / beam1_u:>9.2f} | "
          f"{'same' if answer1_o == answer1_u else 'DIFFER':>8}")
    print(f"{'greedy':>8} | {greedy_o:>11.0f} | {greedy_u:>9.0f} | {greedy_o / greedy_u:>9.2f} | {'n/a':>8}")


if __name__ == "__main__":
    main()
