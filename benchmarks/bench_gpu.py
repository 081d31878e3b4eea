#!/usr/bin/env python
"""Every figure of issue 8's performance table in one run: ours vs the original VisCPM vs the hardware limit or target.

Models have the real sizes with random weights (CPM-Bee 10B = `CpmBeeConfig()`'s defaults, the BEiT-3 large vision
encoder of VisCPM-Chat, the SD-2.1-base UNet and VAE at 512 px from explicit configs, no download); ``--tiny``
swaps in the test suite's tiny configs and runs the same code (that is how the script is tested on CPU).

Sections (each under its own time budget and ``try/except``: a failure becomes the row's value ``error: ...``):

1. bandwidth: a device-to-device copy of a large tensor (bytes read + written per second), and the batch-1 decode
   limit it implies, 16-bit CPM-Bee parameter bytes / bandwidth (tokens/s).
2. chat: the original `VLU_CPMBee` and our `VisCPMChatForConditionalGeneration` share one set of weights (converted
   by our converter, tensors not copied). The ``</s>`` embedding row is zeroed in both (the output head is tied to
   the embedding, so ``</s>`` gets logit 0 and is never among the best candidates): every run decodes the same
   number of tokens, reported as generated. The original's own loop (`VLLMCPMBeeBeamSearch.generate`, as its
   `chat()` calls it: temperature 0.7, repetition penalty 1.1, length penalty 3) at beam 1 and 3, against
   `model.original_beam_search(..., decode_mode=M)` for each decode mode, plus batch 8 at beam 1 (greedy; the
   original takes one image per call). Decode tokens/s = (tokens - 1 per row) / (time from the end of the call's
   prompt prefill to its end), after one warm-up call (for "compile" a full-length one, so the timed call reuses
   the compiled step; per-call set-up such as a CUDA-graph capture is counted). The first-token latency
   (tokenisation + image + prompt prefill + argmax) is its own row. Answers are compared token for token with the
   original's (``same``).
3. paint: the original VisCPM-Paint (around the chat's CPM-Bee, as when both are loaded) against our
   `VisCPMPaintPipeline` with the same weights and generator: seconds per image at ``--size`` px, ``--paint-steps``
   DDPM steps, guidance 7.5, one warm-up each. First as the original ships (UNet and VAE in fp32), then all in
   ``--dtype``; ours also with channels_last UNet+VAE, + `torch.compile(unet)`, and DPMSolverMultistep at
   ``--fast-steps``. The text encoder (prompt + negative) is timed inside those runs.
4. memory (CUDA only, GB = 10^9 bytes): peak GPU memory = the loaded weights + the largest allocation above them
   during a run (so tensors of the other side, shared or not, do not count). Chat in ``--dtype`` (beam 3, dynamic
   cache) is measured in section 2 and the original Chat + Paint (sharing one CPM-Bee, UNet/VAE fp32) in section 3;
   8-bit and 4-bit Chat (transformers `BitsAndBytesConfig`, loaded from an in-memory state dict, beam 3, at most 32
   new tokens) here, if bitsandbytes imports.

Progress is printed as it goes and the markdown table at the end; ``--out FILE`` gets the same as JSON (rewritten
at every new figure, so a run stopped by a timeout keeps what it measured). Not a test: nothing asserts on timing.

    python benchmarks/bench_gpu.py --out gpu.json                     # the real sizes, on CUDA
    python benchmarks/bench_gpu.py --tiny --device cpu --out tiny.json  # tiny configs (tests/test_bench_gpu.py)

On the device machine (no internet) see `benchmarks/gpu_run.sh`: it downloads here the wheels its image lacks and
runs this script there (``run(command="bash benchmarks/gpu_run.sh device", carry=[".whl"], timeout_s=590)``).
"""

import argparse
import contextlib
import copy
import datetime
import functools
import gc
import json
import os
import platform
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (os.path.join(ROOT, "tests"), os.path.join(ROOT, "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)
DEFAULT_THREADS = torch.get_num_threads()  # importing the original sets 1 thread; restored in main()

DECODE_MODES = ("dynamic", "static", "compile", "cuda_graph")
QUERY_NUM = 64
QUESTIONS = [
    "这张图片里有什么？请详细描述一下。", "图中的人在做什么？", "What is in this picture?", "描述一下图片的颜色。",
    "这是在哪里拍的？", "Describe the scene in detail.", "图片里有几个物体？", "What is the mood of this image?",
]
CHAT_SETTINGS = dict(temperature=0.7, repetition_penalty=1.1, length_penalty=3.0)  # the original chat()'s
GUIDANCE = 7.5

# BEiT-3 large at 224/16, as VisCPM's `beit3_large_patch16_224` (torchscale EncoderConfig keys; the text-embedding
# vocabulary is BEiT-3's, unused by VisCPM-Chat but allocated by the original).
BEIT3_LARGE = dict(encoder_embed_dim=1024, encoder_layers=24, encoder_attention_heads=16, encoder_ffn_embed_dim=4096,
                   img_size=224, patch_size=16, vocab_size=64010)
# stabilityai/stable-diffusion-2-1-base: unet/config.json and vae/config.json (the values that differ from
# diffusers' defaults, plus the sizes). The UNet's cross-attention width is the Paint bridge's output (1024).
SD21_BASE_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
    norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
    upcast_attention=False,
)
SD21_BASE_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", sample_size=512, scaling_factor=0.18215,
)


# ---------------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------------


def row_specs(args):
    """(id, figure, unit, limit or target) of every row, in table order."""
    px, steps, fast, n = args.size, args.paint_steps, args.fast_steps, args.new_tokens
    d = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[args.dtype]
    rows = [
        ("copy_bandwidth", "copy bandwidth, device to device (bytes read + written)", "GB/s", None),
        ("decode_limit", "CPM-Bee decode limit at batch 1 (16-bit parameter bytes / bandwidth)", "tokens/s", None),
        ("chat_first_token", f"Chat first token: tokenise + image + prompt prefill, {d}", "ms", "≤ 60"),
    ]
    for beams, target in ((1, "≥ 110"), (3, "≥ 80")):
        for mode in DECODE_MODES:
            rows.append((f"chat_beam{beams}_{mode}", f"Chat decode, beam {beams}, {n} new tokens, {d}, ours {mode}",
                         "tokens/s", target))
    for mode in DECODE_MODES:
        rows.append((f"chat_batch8_{mode}", f"Chat greedy batch 8, {n} new tokens, {d}, ours {mode}, in total",
                     "tokens/s", "≥ 600"))
    rows += [
        ("paint_fp32", f"Paint {px} px, {steps} steps, guidance {GUIDANCE}: UNet/VAE fp32 (as the original ships)",
         "s/image", None),
        ("paint_dtype", f"Paint {px} px, {steps} steps: all {d}", "s/image", "≤ 1.0"),
        ("paint_channels_last", f"Paint {px} px, {steps} steps: {d}, channels_last UNet+VAE", "s/image", "≤ 1.0"),
        ("paint_compile", f"Paint {px} px, {steps} steps: {d}, channels_last + torch.compile(unet)", "s/image",
         "≤ 1.0"),
        ("paint_dpm", f"Paint {px} px, DPMSolverMultistep {fast} steps: {d}, channels_last + compile", "s/image",
         "≤ 0.5"),
        ("paint_text_encoder", f"Paint text encoder (prompt + negative), {d}", "s", None),
        ("mem_chat", f"peak GPU memory: Chat {d} (beam 3, {n} new tokens)", "GB", "≤ 21"),
        ("mem_chat_8bit", "peak GPU memory: Chat 8-bit (bitsandbytes)", "GB", "≤ 13"),
        ("mem_chat_4bit", "peak GPU memory: Chat 4-bit (bitsandbytes nf4)", "GB", "≤ 8"),
        ("mem_chat_paint", "peak GPU memory: Chat + Paint sharing one CPM-Bee", "GB", None),
    ]
    return rows


class Table:
    """Rows of (ours, original, limit) cells: a number, or a string ``n/a: reason`` / ``error: ...``.
    ``on_change`` (if set) is called after every change, to save what was measured so far."""

    def __init__(self, args):
        self.on_change = None
        self.rows = {}
        for key, figure, unit, target in row_specs(args):
            self.rows[key] = dict(id=key, figure=figure, unit=unit, ours=None, original=None,
                                  limit=target if target is not None else "n/a: no target", same=None, notes=[])

    def set(self, key, ours=None, original=None, limit=None, same=None, note=None):
        row = self.rows[key]
        for name, value in (("ours", ours), ("original", original), ("limit", limit)):
            if value is not None:
                row[name] = value
        if same is not None:
            row["same"] = same
        if note:
            row["notes"].append(note)
        self._changed()

    def fill(self, keys, value, columns=("ours", "original")):
        """Put ``value`` into every still-empty cell of ``columns`` of ``keys``."""
        for key in keys:
            for column in columns:
                if self.rows[key][column] is None:
                    self.rows[key][column] = value
        self._changed()

    def _changed(self):
        if self.on_change is not None:
            self.on_change()

    def markdown(self):
        lines = ["| figure | ours | original | hardware limit or target |", "| --- | --- | --- | --- |"]
        for row in self.rows.values():
            cells = [_cell(row[c]) for c in ("ours", "original", "limit")]
            if row["same"] is not None:
                cells[0] += " (same as the original)" if row["same"] else " (differs from the original)"
            lines.append(f"| {row['figure']} [{row['unit']}] | " + " | ".join(cells) + " |")
        notes = [f"- {row['id']}: {'; '.join(row['notes'])}" for row in self.rows.values() if row["notes"]]
        return "\n".join(lines + ([""] + notes if notes else []))

    def as_list(self):
        return [dict(row, ours=_plain(row["ours"]), original=_plain(row["original"])) for row in self.rows.values()]


def _plain(value):
    return "n/a: not run" if value is None else value


def _cell(value):
    value = _plain(value)
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def error_text(error):
    text = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    return "error: " + (text if len(text) < 160 else text[:157] + "...")


# ---------------------------------------------------------------------------------------------------------------------
# Timing, memory and budgets
# ---------------------------------------------------------------------------------------------------------------------


class Budget:
    """Seconds a section may spend, also capped by the whole run's deadline."""

    def __init__(self, name, seconds, deadline):
        self.name, self.seconds = name, seconds
        self.end = min(time.perf_counter() + seconds, deadline)

    def left(self):
        return self.end - time.perf_counter()

    def allows(self, need):
        return self.left() >= need

    def skipped(self):
        return f"n/a: time budget of the {self.name} section ({self.seconds:.0f} s) spent"


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """``(result, seconds)`` of ``fn()``, the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def tensor_bytes(*modules):
    """Bytes of the parameters and buffers of ``modules`` (each tensor once)."""
    seen, total = set(), 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            key = (tensor.untyped_storage().data_ptr(), tensor.data_ptr(), tensor.numel())
            if key not in seen:
                seen.add(key)
                total += tensor.numel() * tensor.element_size()
    return total


def extra_peak(fn, device):
    """``(result, seconds, bytes)``: the largest GPU allocation above what was allocated before ``fn`` (None on CPU)."""
    if torch.device(device).type != "cuda":
        result, seconds = timed(fn, device)
        return result, seconds, None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result, seconds = timed(fn, device)
    return result, seconds, torch.cuda.max_memory_allocated(device) - before


def free_memory(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def compile_backend(backend):
    """`torch.compile` with ``backend`` while inside (our decode_mode="compile" calls `torch.compile` itself).
    ``inductor`` is torch's default and patches nothing; ``eager``/``aot_eager`` trace the same graphs without
    generating code, for quick smoke runs on CPU."""
    if backend == "inductor":
        yield
        return
    original = torch.compile
    torch.compile = functools.partial(original, backend=backend)
    try:
        yield
    finally:
        torch.compile = original


# ---------------------------------------------------------------------------------------------------------------------
# Models: the original and ours with one set of random weights
# ---------------------------------------------------------------------------------------------------------------------


def llm_config(args):
    """The original's CPM-Bee config (JSON keys): the tests' tiny one, or the 10B model = `CpmBeeConfig()`."""
    from oracle import TINY_ORIGINAL_CONFIG

    from viscpm import CpmBeeConfig

    if args.tiny:
        return dict(TINY_ORIGINAL_CONFIG)
    c = CpmBeeConfig()
    return dict(vocab_size=c.vocab_size, dim_model=c.hidden_size, num_heads=c.num_attention_heads, dim_head=c.head_dim,
                dim_ff=c.intermediate_size, num_layers=c.num_hidden_layers, dropout_p=0.0,
                position_bias_num_buckets=c.position_bias_num_buckets,
                position_bias_num_segment_buckets=c.position_bias_num_segment_buckets,
                position_bias_max_distance=c.position_bias_max_distance, eps=c.rms_norm_eps, half=False)


def vision_config(args):
    from oracle import TINY_VISION_CONFIG

    return dict(TINY_VISION_CONFIG) if args.tiny else dict(BEIT3_LARGE)


def rotary_name(dtype):
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


@torch.no_grad()
def randomize_(module, seed, skip_prefix=None, unscaled_matrices=False):
    """Random weights drawn on the parameters' device: norms 1 + 0.1 N (their biases 0.1 N), other vectors 0.1 N,
    matrices N(0, 1) when ``unscaled_matrices`` (CPM-Bee scales inside its linears, as oracle.py draws it) or
    N(0, 1/fan_in) (BEiT-3, the mapping and the bridge)."""
    norms = {f"{prefix}.{name}" if prefix else name
             for prefix, sub in module.named_modules()
             if isinstance(sub, torch.nn.LayerNorm) for name, _ in sub.named_parameters(recurse=False)}
    generators = {}
    for name, param in module.named_parameters():
        if skip_prefix and name.startswith(skip_prefix):
            continue
        if param.device not in generators:
            generators[param.device] = torch.Generator(param.device).manual_seed(seed)
        noise = torch.randn(param.shape, generator=generators[param.device], device=param.device)
        if name in norms or "layernorm" in name:
            value = 1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise
        elif param.dim() < 2:
            value = 0.1 * noise
        elif unscaled_matrices:
            value = noise
        else:
            value = noise * param[0].numel() ** -0.5
        param.copy_(value)


def build_original_chat(args, device, dtype):
    """The original `VLU_CPMBee` (BEiT-3 + CPM-Bee) built on ``device`` with random weights, ``</s>`` row zeroed."""
    from oracle import OriginalConfig, OriginalCpmBee, OriginalTokenizer, cast_original_cpmbee
    from torchscale.architecture.config import EncoderConfig
    from VisCPM.models.beit3 import BEiT3Wrapper
    from VisCPM.models.vlu_cpmbee import VLU_CPMBee

    vision = vision_config(args)
    torch.manual_seed(args.seed)
    with torch.device(device):
        vpm = BEiT3Wrapper(EncoderConfig(multiway=True, layernorm_embedding=False, normalize_output=True,
                                         no_output_layer=True, **vision))
        llm = OriginalCpmBee(OriginalConfig(**llm_config(args)))
        vlu = VLU_CPMBee(llm=llm, vpm=vpm, vision_dim=vision["encoder_embed_dim"], query_num=QUERY_NUM, device=device)
    randomize_(vlu.llm, args.seed, unscaled_matrices=True)
    randomize_(vlu, args.seed + 1, skip_prefix="llm.")
    with torch.no_grad():
        vlu.llm.input_embedding.weight[OriginalTokenizer().eos_id].zero_()
    vlu.to(dtype)
    cast_original_cpmbee(vlu.llm, dtype)
    return vlu.eval()


def ours_chat_from(vlu, args, dtype):
    """Our Chat model over the original's tensors (converted names, same storage)."""
    from viscpm import VisCPMChatForConditionalGeneration
    from viscpm.conversion.convert_viscpm_chat import build_chat_config, convert_chat_state_dict

    config = build_chat_config(llm_config=llm_config(args), vision_config=vision_config(args), query_num=QUERY_NUM)
    config.text_config.rotary_dtype = rotary_name(dtype)
    converted, unmapped, _ = convert_chat_state_dict(vlu.state_dict())
    if unmapped:
        raise RuntimeError(f"the converter left original keys unmapped: {unmapped[:3]}")
    with torch.device("meta"):
        model = VisCPMChatForConditionalGeneration._from_config(config, attn_implementation=args.attn)
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


def chat_processor():
    from oracle import VOCAB_FILE

    from viscpm import CpmBeeTokenizer, VisCPMChatProcessor, VisCPMImageProcessor

    return VisCPMChatProcessor(VisCPMImageProcessor(), CpmBeeTokenizer(VOCAB_FILE), query_num=QUERY_NUM)


def random_pixels(args, count, device):
    """Normalised pixel tensors ``[count, 3, S, S]`` (what both image transforms produce: values in [-1, 1])."""
    size = vision_config(args)["img_size"]
    generator = torch.Generator().manual_seed(args.seed)
    return (torch.rand(count, 3, size, size, generator=generator) * 2 - 1).to(device)


class OriginalChat:
    """The original `VLLMCPMBeeBeamSearch` on ``device`` (oracle.original_chat_generate fixes it to CPU), with the raw
    answer ids of each call kept from its `_decode`."""

    def __init__(self, vlu, device):
        from oracle import OriginalTokenizer
        from VisCPM.generation.vllm_bee import VLLMCPMBeeBeamSearch

        search = VLLMCPMBeeBeamSearch.__new__(VLLMCPMBeeBeamSearch)
        search.model, search.tokenizer, search.device = vlu, OriginalTokenizer(), device
        search.transform = lambda pixels: pixels
        decode = search._decode

        def keep(*args, **kwargs):
            self.raw = decode(*args, **kwargs)
            return self.raw

        search._decode = keep
        self.search, self.vlu, self.raw = search, vlu, None

    def generate(self, pixels, question, **settings):
        """Raw answer ids (the answer slot, without ``</s>``) of the original's generate()."""
        self.search.generate([pixels], max_inp_length=3000, extra_inp_dict={"context": "", "question": question},
                             **settings)
        eos = self.search.tokenizer.eos_id
        ids = [word for word, _slot in self.raw[0]]
        return ids[:-1] if ids and ids[-1] == eos else ids

    @torch.no_grad()
    def first_token(self, pixels, question):
        """Tokenise, embed image + prompt and prefill, as its generate() does; the argmax of the last logits."""
        data = {"image": self.search.tokenizer.unk_token * QUERY_NUM, "context": "", "question": question, "<ans>": ""}
        inputs, _ = self.search._process_list([data], 3000)
        inputs["pixel_values"] = pixels[None]
        hidden, _ = self.vlu.get_vllm_embedding(inputs)
        logits, _, _ = self.vlu.llm.inference(
            inputs["input_ids"], inputs["input_id_subs"], inputs["input_pos"], inputs["context"], inputs["sample_idx"],
            inputs["num_segments"], inputs["segment_ids"], inputs["segment_rel_offset"], inputs["segment_rel"],
            inputs["batch_ext_table_ids"], inputs["batch_ext_table_sub"], hidden_states=hidden,
        )
        return int(logits[0, -1].argmax())


FORWARD_KEYS = ("input_ids", "attention_mask", "segment_ids", "context_mask", "segment_rel", "ext_table_ids",
                "ext_table_sub", "image_bound")


@torch.no_grad()
def ours_last_logits(model, processor, pixels, question, device):
    """Tokenise, embed image + prompt and prefill: the logits of the first answer token."""
    inputs = processor(text=[question], context=[""], return_tensors="pt").to(device)
    outputs = model(**{k: inputs[k] for k in FORWARD_KEYS if k in inputs}, pixel_values=pixels,
                    use_cache=True, logits_to_keep=1)
    return outputs.logits[0, -1]


def ours_beam_search(model, processor, pixels, questions, device, **settings):
    """Raw answer ids per sample (first answer slot) of our original VisCPM-Chat beam search with the image."""
    inputs = processor(text=list(questions), context=[""] * len(questions), return_tensors="pt").to(device)
    answers, _ = model.original_beam_search(**inputs, pixel_values=pixels, **settings)
    return [answer[0] for answer in answers]


def first_token_seconds(fn, device, repeats=3):
    fn()  # warm-up
    return min(timed(fn, device)[1] for _ in range(repeats))


def timed_decode(fn, device, prefill_owner, prefill_method):
    """``(result, seconds, decode_seconds, peak bytes)`` of a generation call ``fn``. ``decode_seconds`` runs from
    the end of the call's first ``prefill_owner.prefill_method`` call (the prompt prefill: our CPM-Bee forward, or
    the original's `inference`), synchronised there, to the end of the call."""
    marks = {}
    method = getattr(prefill_owner, prefill_method)

    def first_call_marked(*args, **kwargs):
        output = method(*args, **kwargs)
        if "prefill" not in marks:
            sync(device)
            marks["prefill"] = time.perf_counter()
        return output

    setattr(prefill_owner, prefill_method, first_call_marked)
    try:
        result, seconds, peak = extra_peak(fn, device)
        end = time.perf_counter()
    finally:
        delattr(prefill_owner, prefill_method)
    return result, seconds, end - marks["prefill"], peak


def decode_rate(tokens, decode_seconds, rows=1):
    """Tokens/s of the decode steps (the first token of each row comes from the prefill)."""
    return (tokens - rows) / decode_seconds


# ---------------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------------


def section_bandwidth(args, table, budget, state):
    device = args.device
    nbytes = (64 if args.tiny else 2048) * 2**20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    src.fill_(1)
    for _ in range(3):
        dst.copy_(src)
    iterations = 20
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync(device)
        start.record()
        for _ in range(iterations):
            dst.copy_(src)
        end.record()
        sync(device)
        seconds = start.elapsed_time(end) / 1000.0
    else:
        _, seconds = timed(lambda: [dst.copy_(src) for _ in range(iterations)], device)
    bandwidth = 2 * nbytes * iterations / seconds
    src = dst = None

    from viscpm import CpmBeeForCausalLM
    from viscpm.conversion.convert_cpmbee import cpmbee_config_from_original

    with torch.device("meta"):
        params = sum(p.numel() for p in CpmBeeForCausalLM(cpmbee_config_from_original(llm_config(args))).parameters())
    state["decode_limit"] = bandwidth / (2 * params)
    hardware = "n/a: hardware figure"
    table.set("copy_bandwidth", ours=hardware, original=hardware, limit=bandwidth / 1e9,
              note=f"{nbytes / 2**20:.0f} MiB copied {iterations} times")
    table.set("decode_limit", ours=hardware, original=hardware, limit=state["decode_limit"],
              note=f"{params / 1e9:.3g} B CPM-Bee parameters x 2 bytes")
    for key in ("chat_beam1_dynamic", "chat_beam1_static", "chat_beam1_compile", "chat_beam1_cuda_graph"):
        table.rows[key]["limit"] = f"≥ 110 (limit {state['decode_limit']:.0f})"


def section_chat(args, table, budget, state):
    device, dtype, n = args.device, args.dtype_t, args.new_tokens
    keys = [key for key in table.rows if key.startswith("chat_")]
    vlu = build_original_chat(args, device, dtype)
    original = OriginalChat(vlu, device)
    model = ours_chat_from(vlu, args, dtype)
    processor = chat_processor()
    pixels = random_pixels(args, 8, device)
    question = QUESTIONS[0]
    print(f"  built: original and ours share {tensor_bytes(model) / 1e9:.3g} GB of weights", flush=True)

    # First token (both sides), then the original's own loop at beam 1 and 3.
    first_original = first_token_seconds(lambda: original.first_token(pixels[0], question), device)
    first_ours = first_token_seconds(
        lambda: int(ours_last_logits(model, processor, pixels[:1], question, device).argmax()), device)
    table.set("chat_first_token", ours=1000 * first_ours, original=1000 * first_original)
    print(f"  first token: ours {1000 * first_ours:.1f} ms, original {1000 * first_original:.1f} ms", flush=True)

    original.generate(pixels[0], question, beam_size=1, max_length=4, **CHAT_SETTINGS)  # warm-up
    original_answers, original_rates, original_peak = {}, {}, 0
    for beams in (1, 3):
        if not budget.allows(10):
            table.fill([k for k in keys if k.startswith(f"chat_beam{beams}_")], budget.skipped(), ("original",))
            continue
        try:
            ids, seconds, decode, peak = timed_decode(
                lambda: original.generate(pixels[0], question, beam_size=beams, max_length=n, **CHAT_SETTINGS),
                device, vlu.llm, "inference")
            original_answers[beams] = ids
            original_rates[beams] = decode_rate(len(ids), decode)
            original_peak = max(original_peak, peak or 0)
            print(f"  original beam {beams}: {len(ids)} tokens in {seconds:.2f} s ({decode:.2f} s decoding)",
                  flush=True)
        except Exception as error:  # noqa: BLE001 - the row shows it
            traceback.print_exc()
            table.fill([k for k in keys if k.startswith(f"chat_beam{beams}_")], error_text(error), ("original",))
            continue
        for mode in DECODE_MODES:
            table.set(f"chat_beam{beams}_{mode}", original=original_rates[beams])
    table.fill([k for k in keys if k.startswith("chat_batch8_")],
               "n/a: the original chat() decodes one image per call", ("original",))
    if torch.device(device).type == "cuda" and original_peak:
        state["mem_chat_original"] = (tensor_bytes(vlu) + original_peak) / 1e9

    # Ours, every decode mode; "compile" last (its first call compiles).
    order = ("dynamic", "static", "cuda_graph", "compile")
    for mode in order:
        for shape in ("beam1", "beam3", "batch8"):
            key = f"chat_{shape}_{mode}"
            beams, rows = (1, 8) if shape == "batch8" else (int(shape[-1]), 1)
            if mode == "cuda_graph" and torch.device(device).type != "cuda":
                table.set(key, ours="n/a: CUDA graphs need a CUDA device")
                continue
            if not budget.allows(90 if mode == "compile" else 8):
                table.set(key, ours=budget.skipped())
                continue
            settings = dict(beam_size=beams, max_length=n, decode_mode=mode, **CHAT_SETTINGS)
            questions = QUESTIONS[:rows]

            def run(max_length=n):
                return ours_beam_search(model, processor, pixels[:rows], questions, device,
                                        **{**settings, "max_length": max_length})

            try:
                with compile_backend(args.compile_backend):
                    _, warm = timed(lambda: run(n if mode == "compile" else 4), device)
                    answers, seconds, decode, peak = timed_decode(run, device, model.language_model, "forward")
            except Exception as error:  # noqa: BLE001 - the row shows it
                traceback.print_exc()
                table.set(key, ours=error_text(error))
                continue
            tokens = sum(len(a) for a in answers)
            timing = f"{seconds:.2f} s ({decode:.2f} s decoding; warm-up call {warm:.1f} s)"
            same = answers[0] == original_answers[beams] if rows == 1 and beams in original_answers else None
            table.set(key, ours=decode_rate(tokens, decode, rows), same=same, note=f"{tokens} tokens in {timing}")
            if peak is not None:
                table.rows[key]["notes"].append(f"{peak / 1e9:.2f} GB allocated above the weights")
                if key == "chat_beam3_dynamic":
                    state["mem_chat_ours"] = (tensor_bytes(model) + peak) / 1e9
            print(f"  ours {mode} {shape}: {tokens} tokens in {timing}", flush=True)


def section_paint(args, table, budget, state):
    from bench_paint import PROMPT, PartTimer
    from conftest import SCHEDULER_CONFIG
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
    from oracle import VOCAB_FILE, build_original_paint, original_paint_inputs, original_paint_state_dict

    from viscpm import CpmBeeTokenizer, VisCPMPaintPipeline, VisCPMPaintTextEncoder
    from viscpm.conversion.convert_cpmbee import cpmbee_config_from_original
    from viscpm import VisCPMPaintTextEncoderConfig
    from viscpm.conversion.convert_viscpm_paint import convert_paint_state_dict

    device, dtype, steps, size = args.device, args.dtype_t, args.paint_steps, args.size
    cuda = torch.device(device).type == "cuda"
    keys = [key for key in table.rows if key.startswith("paint_")]
    vlu = build_original_chat(args, device, dtype)  # Chat and Paint share one CPM-Bee, as the issue measures
    unet, vae = build_sd(args, device)
    original = build_original_paint(vlu.llm, unet, vae, DDPMScheduler.from_config(SCHEDULER_CONFIG), seed=args.seed)
    original.device = torch.device(device)
    original.sd.to(device)

    text_state, _, _ = convert_paint_state_dict(original_paint_state_dict(original))  # ours copies the UNet below
    text_config = cpmbee_config_from_original(llm_config(args))
    text_config.rotary_dtype = rotary_name(dtype)
    config = VisCPMPaintTextEncoderConfig(text_config=text_config, projection_dim=unet.config.cross_attention_dim)
    with torch.device("meta"):
        text_encoder = VisCPMPaintTextEncoder._from_config(config, attn_implementation=args.attn)
    text_encoder.load_state_dict(text_state, strict=True, assign=True)
    ours = VisCPMPaintPipeline(text_encoder=text_encoder.to(dtype).eval(), tokenizer=CpmBeeTokenizer(VOCAB_FILE),
                               unet=copy.deepcopy(unet), vae=copy.deepcopy(vae),
                               scheduler=DDPMScheduler.from_config(SCHEDULER_CONFIG))
    ours.set_progress_bar_config(disable=True)

    timer_original, timer_ours = PartTimer(torch.device(device)), PartTimer(torch.device(device))
    timer_original.watch("text", original.llm)
    timer_original.watch("text", original.sd.trans_block)
    timer_ours.watch("text", ours.text_encoder)

    # The original's packed prompt and negative, built once: the oracle helper loads a tokenizer per call, which the
    # original does not (its time is left out; ours tokenises inside the timed call).
    data, uncond = ({k: v.to(device) if torch.is_tensor(v) else v for k, v in packed.items()}
                    for packed in original_paint_inputs([PROMPT], [""]))

    def run_original(num_steps=steps):
        generator = torch.Generator(device).manual_seed(args.seed)
        return original.model.generate(data, uncond, num_inference_steps=num_steps, height=size, width=size,
                                       guidance_scale=GUIDANCE, generator=generator, output_type="np").images

    def run_ours(num_steps=steps):
        generator = torch.Generator(device).manual_seed(args.seed)
        return ours(PROMPT, num_inference_steps=num_steps, height=size, width=size, guidance_scale=GUIDANCE,
                    generator=generator, output_type="np").images

    def measure(run, timer=None, warm_steps=2, num_steps=steps):
        run(warm_steps)
        if timer is not None:
            timer.reset()
        images, seconds, peak = extra_peak(lambda: run(num_steps), device)
        return images, seconds, timer.totals.get("text", 0.0) if timer is not None else None, peak

    def compare(key, a, b):
        difference = float(abs(a - b).max())
        table.set(key, same=difference <= args.image_tolerance, note=f"largest pixel difference {difference:.2e}")

    def attempt(key, column, fn, need=5):
        if not budget.allows(need):
            table.set(key, **{column: budget.skipped()})
            return None
        try:
            return fn()
        except Exception as error:  # noqa: BLE001 - the row shows it
            traceback.print_exc()
            table.set(key, **{column: error_text(error)})
            return None

    # 1. As the original ships: UNet and VAE in fp32 (CPM-Bee in --dtype); ours the same.
    got = attempt("paint_fp32", "original", lambda: measure(run_original))
    if got:
        images_original, seconds, _, peak = got
        table.set("paint_fp32", original=seconds)
        print(f"  original fp32 UNet: {seconds:.2f} s", flush=True)
        if cuda:
            chat = OriginalChat(vlu, device)
            pixels = random_pixels(args, 1, device)
            _, _, chat_peak = extra_peak(lambda: chat.generate(pixels[0], QUESTIONS[0], beam_size=3, max_length=16,
                                                               **CHAT_SETTINGS), device)
            weights = tensor_bytes(vlu, original.sd)
            state["mem_chat_paint_original"] = (weights + max(peak, chat_peak)) / 1e9
        got = attempt("paint_fp32", "ours", lambda: measure(run_ours, timer_ours))
        if got:
            images_ours, seconds, _, _ = got
            table.set("paint_fp32", ours=seconds)
            compare("paint_fp32", images_original, images_ours)
            print(f"  ours fp32 UNet: {seconds:.2f} s", flush=True)

    # 2. Everything in --dtype; the text encoder timed inside these runs.
    original.sd.to(dtype)
    ours.unet.to(dtype)
    ours.vae.to(dtype)
    images_original = None
    got = attempt("paint_dtype", "original", lambda: measure(run_original, timer_original))
    if got:
        images_original, seconds, text_seconds, _ = got
        table.set("paint_dtype", original=seconds)
        table.set("paint_text_encoder", original=text_seconds)
        print(f"  original {args.dtype}: {seconds:.2f} s (text encoder {text_seconds:.3f} s)", flush=True)
    got = attempt("paint_dtype", "ours", lambda: measure(run_ours, timer_ours))
    if got:
        images_ours, seconds, text_seconds, _ = got
        table.set("paint_dtype", ours=seconds)
        table.set("paint_text_encoder", ours=text_seconds)
        if images_original is not None:
            compare("paint_dtype", images_original, images_ours)
        print(f"  ours {args.dtype}: {seconds:.2f} s (text encoder {text_seconds:.3f} s)", flush=True)
    original = vlu = unet = vae = None  # the original is done: free the device for ours' variants
    free_memory(device)

    only_ours = "n/a: ours only"
    table.fill(["paint_channels_last", "paint_compile", "paint_dpm"], only_ours, ("original",))
    table.fill(["paint_text_encoder"], "n/a: not measured", ("original",))

    # 3. Ours: channels_last, + compiled UNet, + DPMSolver at --fast-steps.
    ours.unet.to(memory_format=torch.channels_last)
    ours.vae.to(memory_format=torch.channels_last)
    got = attempt("paint_channels_last", "ours", lambda: measure(run_ours, timer_ours))
    if got:
        table.set("paint_channels_last", ours=got[1])
        print(f"  ours channels_last: {got[1]:.2f} s", flush=True)
    compiled = attempt("paint_compile", "ours", lambda: ours.unet.compile(fullgraph=True, backend=args.compile_backend)
                       or True)
    if compiled:
        got = attempt("paint_compile", "ours", lambda: measure(run_ours, timer_ours), need=90)
        if got:
            table.set("paint_compile", ours=got[1], note=f"backend {args.compile_backend}")
            print(f"  ours channels_last + compile: {got[1]:.2f} s", flush=True)
    ours.scheduler = DPMSolverMultistepScheduler.from_config(ours.scheduler.config)
    got = attempt("paint_dpm", "ours", lambda: measure(run_ours, timer_ours, num_steps=args.fast_steps),
                  need=10)
    if got:
        table.set("paint_dpm", ours=got[1], note="UNet compiled" if compiled else "UNet not compiled")
        print(f"  ours DPMSolver {args.fast_steps} steps: {got[1]:.2f} s", flush=True)
    table.fill(keys, "n/a: not run")


def build_sd(args, device):
    """(UNet, VAE) in fp32 on ``device``: SD-2.1-base's, or the Paint tests' tiny ones."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if args.tiny:
        from conftest import tiny_unet, tiny_vae

        return tiny_unet().to(device), tiny_vae().to(device)
    torch.manual_seed(args.seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD21_BASE_UNET).eval()
        vae = AutoencoderKL(**SD21_BASE_VAE).eval()
    return unet, vae


def section_memory(args, table, budget, state):
    """The rows measured in the chat and paint sections, and the quantized Chat."""
    device = args.device
    cuda_only = "n/a: peak GPU memory needs CUDA"
    keys = ("mem_chat", "mem_chat_8bit", "mem_chat_4bit", "mem_chat_paint")
    if torch.device(device).type != "cuda":
        table.fill(keys, cuda_only)
        return
    table.set("mem_chat", ours=state.get("mem_chat_ours", "n/a: not measured (see the chat rows)"),
              original=state.get("mem_chat_original", "n/a: not measured (see the chat rows)"))
    table.set("mem_chat_paint", ours="n/a: this script loads ours with weights shared with the original",
              original=state.get("mem_chat_paint_original", "n/a: not measured (see the paint rows)"))
    table.fill(["mem_chat_8bit", "mem_chat_4bit"], "n/a: the original has no quantized path", ("original",))
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # noqa: BLE001 - ImportError or a broken CUDA library
        table.fill(["mem_chat_8bit", "mem_chat_4bit"], f"n/a: bitsandbytes not installed ({type(error).__name__})")
        return
    from transformers import BitsAndBytesConfig

    from viscpm import VisCPMChatForConditionalGeneration
    from viscpm.conversion.convert_viscpm_chat import build_chat_config

    dtype = args.dtype_t
    config = build_chat_config(llm_config=llm_config(args), vision_config=vision_config(args), query_num=QUERY_NUM)
    config.text_config.rotary_dtype = rotary_name(dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = VisCPMChatForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        model.get_input_embeddings().weight[config.text_config.eos_token_id].zero_()
    weights = model.state_dict()  # the source of both quantized loads, kept on the device
    model = None
    processor = chat_processor()
    pixels = random_pixels(args, 1, device)
    new_tokens = min(args.new_tokens, 32)  # the peak hardly depends on the length; quantized decoding is slow
    for key, quantization in (
        ("mem_chat_8bit", BitsAndBytesConfig(load_in_8bit=True)),
        ("mem_chat_4bit", BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_compute_dtype=dtype)),
    ):
        if not budget.allows(20):
            table.set(key, ours=budget.skipped())
            continue
        model = None
        try:
            free_memory(device)
            before = torch.cuda.memory_allocated(device)
            model, load_seconds = timed(lambda: VisCPMChatForConditionalGeneration.from_pretrained(
                None, config=config, state_dict=dict(weights), quantization_config=quantization, dtype=dtype,
                device_map={"": torch.device(device).index or 0}, attn_implementation=args.attn).eval(), device)
            free_memory(device)
            footprint = torch.cuda.memory_allocated(device) - before  # the quantized weights and their states
            finite = bool(torch.isfinite(ours_last_logits(model, processor, pixels, QUESTIONS[0], device)).all())
            answers, seconds, extra = extra_peak(lambda: ours_beam_search(
                model, processor, pixels, QUESTIONS[:1], device, beam_size=3, max_length=new_tokens,
                **CHAT_SETTINGS), device)
            tokens = len(answers[0])
            table.set(key, ours=(footprint + extra) / 1e9,
                      note=f"weights {footprint / 1e9:.2f} GB + {extra / 1e9:.2f} GB while decoding {tokens} tokens "
                           f"at beam 3 in {seconds:.1f} s; logits finite: {finite}; loaded in {load_seconds:.1f} s")
            print(f"  {key}: {(footprint + extra) / 1e9:.2f} GB, {tokens} tokens, finite logits {finite}", flush=True)
        except Exception as error:  # noqa: BLE001 - the row shows it
            traceback.print_exc()
            table.set(key, ours=error_text(error))
        model = None
        free_memory(device)


SECTIONS = (  # (name, function, seconds at --time-limit 420)
    ("bandwidth", section_bandwidth, 10),
    ("chat", section_chat, 200),
    ("paint", section_paint, 140),
    ("memory", section_memory, 70),
)


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def environment(args):
    import diffusers
    import transformers

    info = dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
        diffusers=diffusers.__version__, machine=platform.machine(), cpus=os.cpu_count(),
        threads=torch.get_num_threads(), device=args.device,
    )
    if torch.device(args.device).type == "cuda":
        properties = torch.cuda.get_device_properties(args.device)
        info.update(device_name=properties.name, device_memory_gb=round(properties.total_memory / 1e9, 1),
                    cuda=torch.version.cuda)
    else:
        info.update(device_name=platform.processor() or platform.machine())
    try:
        import subprocess

        info["commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001 - no git on the device machine
        info["commit"] = "unknown"
    return info


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the test suite's tiny configs (same code paths)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--attn", default="sdpa", choices=["eager", "sdpa"], help="our attention implementation")
    parser.add_argument("--new-tokens", type=int, default=None, help="the original's max_length (default 128; tiny 32)")
    parser.add_argument("--size", type=int, default=None, help="Paint image side (default 512; tiny 16)")
    parser.add_argument("--paint-steps", type=int, default=None, help="Paint DDPM steps (default 50; tiny 4)")
    parser.add_argument("--fast-steps", type=int, default=None, help="DPMSolver steps (default 20; tiny 2)")
    parser.add_argument("--image-tolerance", type=float, default=None,
                        help="largest pixel difference counted as the same image (default 1e-4 in fp32, else 0.05)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (inductor; 'eager' or 'aot_eager' for quick smoke runs)")
    parser.add_argument("--time-limit", type=float, default=420.0,
                        help="seconds for the whole run; the section budgets are scaled to it")
    parser.add_argument("--sections", nargs="+", default=[name for name, _, _ in SECTIONS],
                        choices=[name for name, _, _ in SECTIONS])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if torch.device(args.device).type == "cuda" else "float32")
    args.dtype_t = getattr(torch, args.dtype)
    defaults = dict(new_tokens=(32, 128), size=(16, 512), paint_steps=(4, 50), fast_steps=(2, 20))
    for name, (tiny, real) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else real)
    if args.image_tolerance is None:
        args.image_tolerance = 1e-4 if args.dtype == "float32" else 0.05
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    deadline = start + args.time_limit

    import oracle  # noqa: F401  (imports the original VisCPM, which sets 1 thread, and patches it for CPU)

    if torch.device(args.device).type == "cuda":
        # oracle's CPU patch drops `device=` from torch.arange in the original's position module; on CUDA the
        # original runs as it ships.
        import VisCPM.models.modules.position_embedding as position_embedding

        position_embedding.torch = torch
    torch.set_num_threads(args.threads or DEFAULT_THREADS)
    info = environment(args)
    print("environment: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    settings = {k: v for k, v in vars(args).items() if k != "dtype_t"}
    print("settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()), flush=True)

    table = Table(args)
    state = {}
    scale = args.time_limit / sum(seconds for _, _, seconds in SECTIONS)
    result = dict(environment=info, settings=settings)

    def report(final=False):
        result.update(rows=table.as_list(), elapsed_s=round(time.perf_counter() - start, 1), complete=final)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump(result, f, ensure_ascii=False, indent=1)

    table.on_change = report

    for name, section, seconds in SECTIONS:
        keys = _section_rows(name, table)
        if name not in args.sections:
            table.fill(keys, "n/a: section not selected")
            continue
        budget = Budget(name, seconds * scale, deadline)
        print(f"== {name} (budget {budget.seconds:.0f} s, {time.perf_counter() - start:.0f} s elapsed)", flush=True)
        try:
            section(args, table, budget, state)
        except Exception as error:  # noqa: BLE001 - the rows show it, the run goes on
            traceback.print_exc()
            table.fill(keys, error_text(error))
        torch._dynamo.reset()  # compiled graphs hold on to the section's tensors
        free_memory(args.device)
        table.fill(keys, "n/a: not run")
        report()
    report(final=True)
    print("\n" + table.markdown() + "\n", flush=True)
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)
    return result


def _section_rows(name, table):
    prefix = {"bandwidth": ("copy_", "decode_"), "chat": ("chat_",), "paint": ("paint_",), "memory": ("mem_",)}[name]
    return [key for key in table.rows if key.startswith(prefix)]


if __name__ == "__main__":
    main()
