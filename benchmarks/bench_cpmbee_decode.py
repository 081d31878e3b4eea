#!/usr/bin/env python
"""Per-token decode time of our `CpmBeeForCausalLM` (DynamicCache; or see `--cache`) against
the original VisCPM `CPMBeeTorch` (its own key/value buffer), on one medium random-weight config, at several
prompt lengths.

For each prompt length both models get the same weights and the same structured prompt (a dict whose text
tokenizes to about that many tokens, built by the original's `VLLMCPMBeeGeneration._process_list`):

1. prefill the prompt once (timed on its own);
2. feed the answer segment's ``<s>`` (one step, used as the warm-up, not timed);
3. run ``--steps`` greedy single-token steps, each feeding *our* argmax to both models (alternating the two
   models step by step), and time every step with `time.perf_counter`; a repeat's figure is the median step.

Each length is measured ``--repeats`` times (fresh prefill each) and the table shows the best repeat, since on a
shared machine a burst of other work inflates a whole repeat; the per-repeat medians are printed below it.

Both models see the same tokens; if their argmax ever differs the step is reported as a mismatch (random
weights can make near-ties flip between two kernels, so a rare mismatch is a numerics note, not a failure).

A second table times the whole decoding that `VisCPMChat.chat` uses (the original beam search: beam 3,
temperature 0.7, repetition penalty 1.1, length penalty 3, ``--beam-tokens`` new tokens), the original's
`VLLMCPMBeeBeamSearch._decode` against our `cpmbee_beam_search`, prefill included, and checks the answers agree.

This is a measurement script, not a test: nothing here asserts on timing.

    cd /work/main && /work/venv/bin/python benchmarks/bench_cpmbee_decode.py
    ... --lengths 128 512 1024 --steps 32 --dim 512 --layers 8 --dtype float32 --attn sdpa
"""

import argparse
import copy
import os
import platform
import random
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
# Importing the original package (VisCPM/viscpm_chat.py) calls torch.set_num_threads(1); remember the default so
# both models run with torch's own thread count.
DEFAULT_THREADS = torch.get_num_threads()


def to_ours(state_dict):
    """The original's weights under our names (the converter's mapping)."""
    from viscpm.conversion.convert_cpmbee import convert_cpmbee_state_dict

    converted, unmapped = convert_cpmbee_state_dict(state_dict, "")
    assert not unmapped, unmapped
    return converted


def make_prompt(gen, tokenizer, target_len, seed):
    """A structured prompt whose context is about `target_len` tokens: random CJK characters under one key,
    followed by three separate out-of-vocabulary characters (the second and third become ext-table entries,
    so the output has ext columns as in real use), and an empty answer."""
    rng = random.Random(seed)
    chars = sorted(t for t in tokenizer.encoder if len(t) == 1 and "\u4e00" <= t <= "\u9fff")
    pool = [rng.choice(chars) for _ in range(4 * target_len + 64)]
    n_chars = target_len
    for _ in range(8):
        data = {"input": "".join(pool[:n_chars]) + " 𠀀 𠀁 𠀂", "<ans>": ""}
        model_inputs, info = gen._process_list([copy.deepcopy(data)])
        got = model_inputs["input_ids"].shape[1]
        if got == target_len:
            break
        n_chars = max(1, n_chars + (target_len - got))
    return model_inputs, info, data


def ours_inputs(model_inputs, vocab_size):
    """Convert the original's packed inputs (batch of one) to ours: raw ids (ext entries as vocab + k),
    segment ids, context, the [B, n, n] segment relation table and the ext table."""
    ext_ids = model_inputs["batch_ext_table_ids"].long()
    ext_sub = model_inputs["batch_ext_table_sub"].long()
    ext_index = {(int(i), int(s)): vocab_size + k for k, (i, s) in enumerate(zip(ext_ids, ext_sub))}
    ids = model_inputs["input_ids"].long().clone()
    subs = model_inputs["input_id_subs"]
    for j in torch.nonzero(subs[0] > 0).flatten().tolist():
        ids[0, j] = ext_index[(int(ids[0, j]), int(subs[0, j]))]
    n = int(model_inputs["num_segments"][0, -1])
    segment_rel = model_inputs["segment_rel"][0, : n * n].long().view(1, n, n)
    return dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        segment_ids=model_inputs["segment_ids"].long(),
        context_mask=model_inputs["context"].long(),
        segment_rel=segment_rel,
        ext_table_ids=ext_ids[None],
        ext_table_sub=ext_sub[None],
    ), ext_ids, ext_sub


class OriginalDecoder:
    """The original's incremental decoding, as `VLLMCPMBeeBeamSearch._decode` feeds it (one beam)."""

    def __init__(self, model, model_inputs, answer_segment):
        self.model = model
        self.mi = model_inputs
        self.answer_segment = answer_segment
        self.ext_ids = model_inputs["batch_ext_table_ids"]
        self.ext_sub = model_inputs["batch_ext_table_sub"]
        self.vocab_size = model.input_embedding.weight.shape[0]
        self.state = None
        self.position = 0

    def prefill(self):
        mi = self.mi
        with torch.no_grad():
            _, _, self.state = self.model.inference(
                mi["input_ids"], mi["input_id_subs"], mi["input_pos"], mi["context"], mi["sample_idx"],
                mi["num_segments"], mi["segment_ids"], mi["segment_rel_offset"], mi["segment_rel"],
                self.ext_ids, self.ext_sub, past_key_values=None,
            )

    def step(self, token):
        """Feed one raw token id (ids >= vocab_size are ext-table entries); return last logits [V + E]."""
        sub = 0
        if token >= self.vocab_size:
            k = token - self.vocab_size
            token, sub = int(self.ext_ids[k]), int(self.ext_sub[k])
        one = lambda value, dtype=torch.int32: torch.tensor([[value]], dtype=dtype)  # noqa: E731
        with torch.no_grad():
            logits, _, self.state = self.model.inference(
                one(token), one(sub), one(self.position), one(True, torch.bool), one(0),
                self.mi["num_segments"][:, -1:], one(self.answer_segment), self.mi["segment_rel_offset"][:, -1:],
                self.mi["segment_rel"], self.ext_ids, self.ext_sub, past_key_values=self.state,
            )
        self.position += 1
        return logits[0, -1]


class OursDecoder:
    """Our model with a DynamicCache; the per-token metadata always covers cached + new tokens."""

    def __init__(self, model, inputs, answer_segment, cache="dynamic", max_new_tokens=0):
        from transformers.cache_utils import DynamicCache, StaticCache

        self.model = model
        self.inputs = inputs
        self.answer_segment = answer_segment
        if cache == "static":
            max_cache_len = inputs["input_ids"].shape[1] + max_new_tokens
            self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        else:
            self.cache = DynamicCache(config=model.config)
        self.attention_mask = inputs["attention_mask"]
        self.segment_ids = inputs["segment_ids"]
        self.context_mask = inputs["context_mask"]
        self.static = {k: inputs[k] for k in ("segment_rel", "ext_table_ids", "ext_table_sub")}

    def _call(self, input_ids):
        with torch.no_grad():
            out = self.model(
                input_ids=input_ids, attention_mask=self.attention_mask, segment_ids=self.segment_ids,
                context_mask=self.context_mask, cache=self.cache, use_cache=True, **self.static,
            )
        self.cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        return out.logits[0, -1]

    def prefill(self):
        self._call(self.inputs["input_ids"])

    def step(self, token):
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones((1, 1))], dim=1)
        self.segment_ids = torch.cat([self.segment_ids, self.segment_ids.new_full((1, 1), self.answer_segment)], 1)
        self.context_mask = torch.cat([self.context_mask, self.context_mask.new_zeros((1, 1))], dim=1)
        return self._call(torch.tensor([[token]]))


class OursStaticDecoder:
    """Our `CpmBeeStaticDecoder` (the fixed-shape step of ``decode_mode="static"`` / ``"compile"``)."""

    def __init__(self, model, inputs, answer_segment, mode="static", max_new_tokens=0):
        from viscpm.modeling.generation_cpmbee import CpmBeeStaticDecoder

        self.model = model
        self.inputs = inputs
        self.decoder = CpmBeeStaticDecoder(model, 1, inputs["input_ids"].shape[1] + max_new_tokens, mode=mode)
        self.segment = torch.tensor([answer_segment])

    def prefill(self):
        meta = {k: v for k, v in self.inputs.items() if k != "input_ids"}
        with torch.no_grad():
            self.model(input_ids=self.inputs["input_ids"], cache=self.decoder.cache, use_cache=True, **meta)
        self.decoder.start(self.inputs["input_ids"].shape[1], **meta)

    def step(self, token):
        with torch.no_grad():
            return self.decoder.step(torch.tensor([token]), self.segment)[0]


def load_average():
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, (time.perf_counter() - start) * 1000.0


def run_length(orig, ours, gen, tokenizer, target_len, steps, seed, repeats=1, cache="dynamic"):
    """Best (smallest) of `repeats` measurements, each a fresh prefill + decode: on a shared machine a burst of
    other work inflates a whole repeat, and the minimum over repeats is the least disturbed one."""
    model_inputs, info, _ = make_prompt(gen, tokenizer, target_len, seed)
    runs = [measure(orig, ours, tokenizer, model_inputs, info, steps, cache) for _ in range(repeats)]
    best = {key: min(run[key] for run in runs) for key in ("o_ms", "u_ms", "o_prefill", "u_prefill")}
    return {**runs[0], **best, "o_all": [r["o_ms"] for r in runs], "u_all": [r["u_ms"] for r in runs]}


def measure(orig, ours, tokenizer, model_inputs, info, steps, cache="dynamic"):
    prompt_len = model_inputs["input_ids"].shape[1]
    answer_segment = int(info[0]["predict_segments"][0][0])
    inputs, _, _ = ours_inputs(model_inputs, ours.config.vocab_size)

    o_dec = OriginalDecoder(orig, model_inputs, answer_segment)
    if cache.startswith("decoder"):
        mode = "compile" if cache == "decoder-compile" else "static"
        u_dec = OursStaticDecoder(ours, inputs, answer_segment, mode, max_new_tokens=steps + 1)
    else:
        u_dec = OursDecoder(ours, inputs, answer_segment, cache, max_new_tokens=steps + 1)
    _, o_prefill = timed(o_dec.prefill)
    _, u_prefill = timed(u_dec.prefill)

    # warm-up step: the answer segment's <s>
    bos = tokenizer.bos_id
    o_logits = o_dec.step(bos)
    u_logits = u_dec.step(bos)
    o_times, u_times, mismatches = [], [], []
    max_diff = float((o_logits.float() - u_logits.float()).abs().max())
    for i in range(steps):
        token = int(u_logits.argmax())
        if int(o_logits.argmax()) != token:
            mismatches.append((i, int(o_logits.argmax()), token))
        o_logits, o_ms = timed(o_dec.step, token)
        u_logits, u_ms = timed(u_dec.step, token)
        o_times.append(o_ms)
        u_times.append(u_ms)
        max_diff = max(max_diff, float((o_logits.float() - u_logits.float()).abs().max()))
    if int(o_logits.argmax()) != int(u_logits.argmax()):
        mismatches.append((steps, int(o_logits.argmax()), int(u_logits.argmax())))
    return dict(
        prompt_len=prompt_len, o_ms=statistics.median(o_times), u_ms=statistics.median(u_times),
        o_prefill=o_prefill, u_prefill=u_prefill, mismatches=mismatches, max_diff=max_diff,
    )


def run_beam(orig, ours, gen, tokenizer, target_len, new_tokens, seed, repeats, modes=("dynamic",)):
    """The whole original decoding as `VisCPMChat.chat` runs it (beam 3, temperature 0.7, repetition penalty 1.1,
    length penalty 3): the original's `VLLMCPMBeeBeamSearch._decode` against our `cpmbee_beam_search` on the
    same prompt, prefill included; per generated token, best of `repeats`, answers compared."""
    from oracle import VOCAB_FILE, original_beam_search

    from viscpm import CpmBeeTokenizer, cpmbee_beam_search

    _, _, data = make_prompt(gen, tokenizer, target_len, seed)
    inputs = CpmBeeTokenizer(VOCAB_FILE)(data, return_tensors="pt")
    settings = dict(beam_size=3, max_length=new_tokens, repetition_penalty=1.1, length_penalty=3.0, temperature=0.7)
    o_times, u_times, same = [], {mode: [] for mode in modes}, True
    for _ in range(repeats):
        answer_o, o_ms = timed(lambda: original_beam_search(orig, [data], **settings))
        o_times.append(o_ms)
        for mode in modes:
            answer_u, u_ms = timed(lambda: cpmbee_beam_search(ours, **inputs, **settings, decode_mode=mode))
            u_times[mode].append(u_ms)
            same = same and answer_o == answer_u
    tokens = max(1, len(answer_o[0][0]) + 1)
    return dict(prompt_len=inputs["input_ids"].shape[1], tokens=tokens, o_ms=min(o_times) / tokens,
                u_ms={mode: min(times) / tokens for mode, times in u_times.items()},
                u_first={mode: times[0] / tokens for mode, times in u_times.items()}, same=same)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn", default=None, choices=["eager", "sdpa"],
                        help="our attention implementation (default: the model's default)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="measure each length this many times (fresh prefill each) and report the best")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--cache", default="dynamic", choices=["dynamic", "static", "decoder", "decoder-compile"],
                        help="our single step: DynamicCache (generate's default), transformers' StaticCache, or our "
                             "CpmBeeStaticDecoder step, eager or compiled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--beam-tokens", type=int, default=32,
                        help="answer length (the original's max_length) of the beam-search table; 0 skips it")
    parser.add_argument("--decode-modes", nargs="+", default=["dynamic", "static"],
                        choices=["dynamic", "static", "compile", "cuda_graph"],
                        help="our beam search's decode_mode(s) in the beam-search table")
    args = parser.parse_args()

    from oracle import OriginalTokenizer, build_original_cpmbee, cast_original_cpmbee  # noqa: E402  (patches the original for CPU)
    from VisCPM.generation.vllm_bee import VLLMCPMBeeGeneration

    from viscpm import CpmBeeForCausalLM
    from viscpm.conversion.convert_cpmbee import cpmbee_config_from_original

    torch.set_num_threads(args.threads or DEFAULT_THREADS)
    dtype = getattr(torch, args.dtype)
    heads = max(1, args.dim // 64)
    original_config = dict(
        vocab_size=86583, dim_model=args.dim, num_heads=heads, dim_head=args.dim // heads, dim_ff=args.dim * 5 // 2,
        num_layers=args.layers, dropout_p=0.0, position_bias_num_buckets=256, position_bias_num_segment_buckets=256,
        position_bias_max_distance=2048, eps=1e-6, half=False,
    )
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    orig = cast_original_cpmbee(build_original_cpmbee(args.seed, **original_config), dtype)
    config = cpmbee_config_from_original(original_config)
    if dtype != torch.float32:
        config.rotary_dtype = args.dtype  # the embedding rotation in the model dtype in both
    if args.attn is not None:
        config._attn_implementation = args.attn
    ours = CpmBeeForCausalLM(config).eval()
    ours.load_state_dict(to_ours(orig.state_dict()), strict=True)
    ours.to(dtype)
    if args.attn is not None:
        ours.config._attn_implementation = args.attn
    build_s = time.perf_counter() - start

    tokenizer = OriginalTokenizer()
    gen = VLLMCPMBeeGeneration.__new__(VLLMCPMBeeGeneration)
    gen.tokenizer, gen.device = tokenizer, "cpu"

    print(f"machine: {platform.machine()} {platform.processor() or ''} | python {platform.python_version()} | "
          f"torch {torch.__version__} | threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()})"
          f" | cpus {os.cpu_count()} (VisCPM's import sets 1 thread; reset to {torch.get_num_threads()}, torch's default is "
          f"{DEFAULT_THREADS}) | load average at start {load_average()}")
    print(f"config: dim {args.dim}, {args.layers} layers, {heads} heads x {args.dim // heads}, ff {args.dim * 5 // 2}, "
          f"vocab 86583, {args.dtype}, ours attn={ours.config._attn_implementation} cache={args.cache}, steps {args.steps} "
          f"(median after 1 warm-up step), best of {args.repeats} repeats, models built in {build_s:.1f}s")

    # Untimed warm-up of both models (first-call allocations and kernel selection), so that the first
    # prompt length's prefill is not charged to whichever model runs first.
    run_length(orig, ours, gen, tokenizer, 32, 2, args.seed + 1, 1, args.cache)

    rows = []
    for length in args.lengths:
        rows.append(run_length(orig, ours, gen, tokenizer, length, args.steps, args.seed, args.repeats, args.cache))

    header = (f"{'prompt len':>10} | {'original ms/tok':>15} | {'ours ms/tok':>11} | {'ratio o/u':>9} | "
              f"{'prefill orig ms':>15} | {'prefill ours ms':>15} | {'argmax':>8}")
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        agree = "same" if not r["mismatches"] else f"{len(r['mismatches'])} diff"
        print(f"{r['prompt_len']:>10} | {r['o_ms']:>15.2f} | {r['u_ms']:>11.2f} | {r['o_ms'] / r['u_ms']:>9.2f} | "
              f"{r['o_prefill']:>15.1f} | {r['u_prefill']:>15.1f} | {agree:>8}")
    if args.beam_tokens:
        modes = args.decode_modes
        beams = [run_beam(orig, ours, gen, tokenizer, length, args.beam_tokens, args.seed, args.repeats, modes)
                 for length in args.lengths]
        header = (f"{'prompt len':>10} | {'original ms/tok':>15} | "
                  + " | ".join(f"{'ours ' + m + ' ms/tok':>20} | {'ratio o/u':>9}" for m in modes)
                  + f" | {'tokens':>6} | {'answers':>8}")
        print()
        print("the original decoding of chat(): beam 3 with its penalties, prefill included, per generated token "
              "(best repeat; ours by decode_mode)")
        print(header)
        print("-" * len(header))
        for r in beams:
            print(f"{r['prompt_len']:>10} | {r['o_ms']:>15.2f} | "
                  + " | ".join(f"{r['u_ms'][m]:>20.2f} | {r['o_ms'] / r['u_ms'][m]:>9.2f}" for m in modes)
                  + f" | {r['tokens']:>6} | {'same' if r['same'] else 'DIFFER':>8}")
        print("first repeat (compile and capture included), ms/tok: " + "; ".join(
            f"len {r['prompt_len']}: " + ", ".join(f"{m} {r['u_first'][m]:.2f}" for m in modes) for r in beams))
    print()
    print(f"load average at end {load_average()} (other work on the machine inflates times; see the per-repeat medians)")
    for r in rows:
        print(f"len {r['prompt_len']}: per-repeat medians original {' '.join(f'{t:.2f}' for t in r['o_all'])} ms, "
              f"ours {' '.join(f'{t:.2f}' for t in r['u_all'])} ms")
        print(f"  max |logit difference| over the steps {r['max_diff']:.3g}")
        for step, o_tok, u_tok in r["mismatches"]:
            print(f"  MISMATCH at step {step}: original argmax {o_tok}, ours argmax {u_tok} (ours fed to both)")


if __name__ == "__main__":
    main()
