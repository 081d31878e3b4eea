"""Decoding rules of the original CPM-Bee / VisCPM code, for exact reproduction of its answers.

* `CpmBeeVocabMaskLogitsProcessor`: a row may produce only its own ext-table entries, and ``<unk>`` only
  when its input contained an out-of-vocabulary piece (both set to -10000, as the original does).
* `CpmBeeRepetitionPenaltyLogitsProcessor`: CTRL-style penalty over the tokens of the answer only
  (the answer's ``<s>`` included, ext tokens counted by their base id), not over the prompt.
* `cpmbee_beam_search`: the original beam search, step for step: temperature inside beam search, the top
  ``2 * beams`` candidates per step, hypotheses scored ``sum_logprob / len ** length_penalty``, several
  answer segments filled one after another, and the original's length limit and stopping rule. Its loop
  (`run_beam_search`) drives a decoder object (`CpmBeeDecoder`: ``prefill``, ``step``, ``reorder``) and chooses
  the next beams in `select_candidates`; `OriginalSearch` reads its settings from a generation config and builds
  transformers' output classes from what it found (VisCPM-Chat's ``generate()``).
* Decoders: `CpmBeeDynamicDecoder` (a growing `DynamicCache`, the reference) and `CpmBeeStaticDecoder` (the decode
  step over preallocated buffers, with every shape fixed for the whole answer, so the step can be compiled once or
  replayed as a CUDA graph: ``decode_mode``).
* Argument checks (``check_*``): a bad generation argument is a clear error before any work, and the static
  buffers are refused before they are allocated when they exceed the memory the process can get.

The standard ``model.generate()`` (greedy, sampling, transformers' beam search) remains available; these
pieces are what VisCPM-Chat uses to give the same answer as the original for the same checkpoint.
"""

import math
import numbers
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerateBeamDecoderOnlyOutput

MASKED_LOGIT = -10000.0


def _rows(tensor: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Repeat a per-sample tensor for the beams/samples that generate() laid out per row."""
    if tensor.shape[0] == num_rows:
        return tensor
    if num_rows % tensor.shape[0]:
        raise ValueError(f"cannot spread {tensor.shape[0]} samples over {num_rows} rows")
    return tensor.repeat_interleave(num_rows // tensor.shape[0], dim=0)


# -- argument checks: a bad generation argument is a clear error here, not a failure deep inside torch -------------


def check_count(value, name: str, minimum: int = 1, why: str = "") -> None:
    """``value`` must be a whole number >= ``minimum`` (``None`` means the default); ``why`` is added to the message
    of an out-of-range value."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a whole number >= {minimum}, got {type(value).__name__} {value!r}: pass e.g. "
                        f"{name}={_count_example(value, minimum)}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}{why}")


def _count_example(value, minimum: int) -> int:
    try:
        return max(minimum, int(float(value)))
    except (TypeError, ValueError):
        return minimum


def check_real(value, name: str, minimum: float, inclusive: bool, why: str = "") -> None:
    """``value`` must be a finite real number above ``minimum`` (or equal to it when ``inclusive``); ``None`` means
    the default. ``why`` is added to the message of an out-of-range value."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if value < minimum or (value == minimum and not inclusive):
        bound = f">= {minimum}" if inclusive else f"> {minimum}"
        raise ValueError(f"{name} must be {bound}, got {value}{why}")


def check_share(value, name: str, low: float, high: float, low_open: bool, high_open: bool, why: str) -> None:
    """``value`` must be a real number in the interval from ``low`` to ``high`` (open at the ends named);
    ``None`` means the default. ``why`` says what the setting is, for the message."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not (value > low if low_open else value >= low) or not (value < high if high_open else value <= high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value}: {why}")


SAMPLING_SHARES = {
    # name: (low, high, low open, high open, what it is)
    "top_p": (0.0, 1.0, True, False, "the probability mass sampled from (1 keeps every token)"),
    "typical_p": (0.0, 1.0, True, False, "the typical-sampling mass (1 turns it off)"),
    "min_p": (0.0, 1.0, False, False, "a token's least probability relative to the top token's (0 turns it off)"),
    "epsilon_cutoff": (0.0, 1.0, False, True, "the least probability a token keeps (0 turns it off)"),
    "eta_cutoff": (0.0, 1.0, False, True, "the eta-sampling cutoff (0 turns it off)"),
}
"""The sampling settings that are shares of probability, with their ranges (as transformers' logits processors
define them; out of range they fail late, deep inside the processor, or quietly do nothing)."""


TEMPERATURE_ZERO = (
    ": the temperature divides the logits; a temperature of 0 is not a setting but a division by zero. The original "
    "beam search is deterministic at any temperature (1.0 leaves the logits as they are); for the single most likely "
    "token at each step use num_beams=1"
)


def check_original_settings(beam_size, max_length, repetition_penalty, length_penalty, temperature,
                            names: dict | None = None) -> None:
    """The settings of the original beam search (``names`` maps them to the caller's argument names)."""
    names = {"beam_size": "beam_size", "max_length": "max_length", "repetition_penalty": "repetition_penalty",
             "length_penalty": "length_penalty", "temperature": "temperature", **(names or {})}
    check_count(beam_size, names["beam_size"])
    check_count(max_length, names["max_length"])
    check_real(repetition_penalty, names["repetition_penalty"], 1.0, inclusive=True,
               why=" (the original's penalty divides positive logits of repeated tokens by it; 1.0 is no penalty)")
    check_real(length_penalty, names["length_penalty"], -math.inf, inclusive=False)
    check_real(temperature, names["temperature"], 0.0, inclusive=False,
               why=TEMPERATURE_ZERO if temperature == 0 else "")


def check_generation_config(config, kwargs: dict, original: bool, temperature=None) -> None:
    """The settings ``generate(**kwargs)`` is about to run with: ``kwargs`` over ``config`` (checked before
    ``config.update(**kwargs)``, which compares them with numbers). ``original``: they go to the original beam
    search, which reads ``temperature`` (given separately: it may come from ``beam_temperature``) and the original's
    length argument ``original_max_length``."""

    def value(name):
        return kwargs[name] if name in kwargs else getattr(config, name, None)

    for name in ("num_beams", "max_new_tokens", "max_length", "num_return_sequences"):
        check_count(value(name), name)
    for name, (low, high, low_open, high_open, why) in SAMPLING_SHARES.items():
        check_share(value(name), name, low, high, low_open, high_open, why)
    check_count(value("top_k"), "top_k", minimum=0,
                why=": the number of most likely tokens sampled from (0 keeps every token)")
    if original:
        check_original_settings(value("num_beams"), value("original_max_length"), value("repetition_penalty"),
                                value("length_penalty"), temperature,
                                names={"beam_size": "num_beams", "max_length": "original_max_length"})
        return
    check_real(value("repetition_penalty"), "repetition_penalty", 0.0, inclusive=False)
    check_real(value("length_penalty"), "length_penalty", -math.inf, inclusive=False)
    if value("do_sample"):
        temperature = value("temperature")
        check_real(temperature, "temperature", 0.0, inclusive=False,
                   why=" (for the most likely tokens, use do_sample=False)" if temperature == 0 else "")


def check_input_tensors(inputs: dict) -> None:
    """Tensors given to ``generate()`` must hold values: a meta tensor (a shape without data) is refused by name."""
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.is_meta:
            raise ValueError(f"{name} is a meta tensor (a shape without values): pass the real tensor, e.g. the "
                             "processor's or tokenizer's output")


def check_static_buffers(model, rows: int, length: int, device: torch.device, mode: str) -> None:
    """Refuse the static decoder's key/value buffers (``rows`` x ``length`` slots in every layer) before allocating
    them, when they exceed the memory this process can get on ``device``."""
    config = model.config
    itemsize = model.dtype.itemsize if model.dtype.is_floating_point else 4
    need = 2 * config.num_hidden_layers * rows * config.num_attention_heads * length * config.head_dim * itemsize
    need += 4 * rows * length * 8  # the per-slot segment, context, padding and relation rows
    have, where = _memory_limit(device)
    if have is not None and need > have:
        raise ValueError(
            f"decode_mode={mode!r} preallocates key/value buffers for {rows} rows x {length} positions: "
            f"{need / 1e9:.1f} GB, more than {where} ({have / 1e9:.1f} GB). Lower the answer length limit "
            "(max_new_tokens / max_length), or use decode_mode='dynamic', whose cache grows with the answer"
        )


def _memory_limit(device: torch.device) -> tuple[int | None, str]:
    """The bytes this process can still allocate on ``device`` and what limits them (None where unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"the free memory of {device}"
    if device.type != "cpu":
        return None, ""
    limits = []
    meminfo = _proc_fields("/proc/meminfo")
    if "MemAvailable" in meminfo:
        limits.append((meminfo["MemAvailable"], "the available system memory"))
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            used = _proc_fields("/proc/self/status").get("VmSize", 0)
            limits.append((max(soft - used, 0), "what the process's address-space limit (RLIMIT_AS) leaves"))
    except ImportError:  # not on this platform
        pass
    return min(limits) if limits else (None, "")


def _proc_fields(path: str) -> dict[str, int]:
    """``Name: <n> kB`` lines of a /proc file, in bytes (empty where the file does not exist)."""
    fields = {}
    try:
        with open(path, encoding="ascii") as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
                    fields[name] = int(parts[0]) * 1024
    except OSError:
        pass
    return fields


class CpmBeeVocabMaskLogitsProcessor(LogitsProcessor):
    """Forbid ``<unk>`` (unless ``unk_allowed``) and the ext-table entries of other samples in the batch."""

    def __init__(self, vocab_size: int, unk_token_id: int, ext_table_mask=None, unk_allowed=None):
        self.vocab_size = vocab_size
        self.unk_token_id = unk_token_id
        self.ext_table_mask = ext_table_mask
        self.unk_allowed = unk_allowed

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = scores.shape[0]
        scores = scores.clone()
        if self.unk_allowed is not None:
            forbid_unk = ~_rows(self.unk_allowed.to(scores.device).bool(), rows)
            scores[:, self.unk_token_id] = torch.where(
                forbid_unk, torch.full_like(scores[:, 0], MASKED_LOGIT), scores[:, self.unk_token_id]
            )
        if self.ext_table_mask is not None and self.ext_table_mask.shape[-1] > 0:
            own = _rows(self.ext_table_mask.to(scores.device).bool(), rows)
            ext = scores[:, self.vocab_size: self.vocab_size + own.shape[-1]]
            scores[:, self.vocab_size: self.vocab_size + own.shape[-1]] = ext.masked_fill(~own, MASKED_LOGIT)
        return scores


def add_vocab_rule(logits_processor, text_config, ext_table_mask=None, unk_allowed=None):
    """``logits_processor`` plus `CpmBeeVocabMaskLogitsProcessor` when the tokenizer's masks are given."""
    if ext_table_mask is None and unk_allowed is None:
        return logits_processor
    rule = CpmBeeVocabMaskLogitsProcessor(
        vocab_size=text_config.vocab_size, unk_token_id=text_config.unk_token_id,
        ext_table_mask=ext_table_mask, unk_allowed=unk_allowed,
    )
    return LogitsProcessorList([*(logits_processor or []), rule])


def apply_answer_repetition_penalty(scores: torch.Tensor, answer_tokens: torch.Tensor, penalty: float):
    """CTRL penalty on ``scores`` ([rows, vocab]) for the (base) ids in ``answer_tokens`` ([rows, n])."""
    if penalty == 1.0 or answer_tokens.shape[-1] == 0:
        return scores
    picked = torch.gather(scores, 1, answer_tokens)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, answer_tokens, picked)


def base_ids(raw_ids: torch.Tensor, ext_table_ids: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """Raw ids (ids >= vocab_size index the ext table) to their base vocabulary ids."""
    if ext_table_ids is None or ext_table_ids.shape[-1] == 0:
        return raw_ids
    ext = _rows(ext_table_ids.to(raw_ids.device), raw_ids.shape[0])
    index = (raw_ids - vocab_size).clamp(min=0, max=ext.shape[-1] - 1)
    return torch.where(raw_ids >= vocab_size, torch.gather(ext, 1, index), raw_ids)


class CpmBeeRepetitionPenaltyLogitsProcessor(LogitsProcessor):
    """The original's repetition penalty: only the answer so far (from the prompt's final ``<s>``) counts."""

    def __init__(self, penalty: float, prompt_length: int, vocab_size: int, ext_table_ids=None):
        check_real(penalty, "repetition_penalty", 1.0, inclusive=True)
        self.penalty = penalty
        self.start = prompt_length - 1
        self.vocab_size = vocab_size
        self.ext_table_ids = ext_table_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        answer = base_ids(input_ids[:, self.start:], self.ext_table_ids, self.vocab_size)
        return apply_answer_repetition_penalty(scores, answer, self.penalty)


DECODE_MODES = ("dynamic", "static", "compile", "cuda_graph")
STATIC_SLOTS_MULTIPLE = 128
# The per-token inputs of the prompt (besides the ids or embeddings), in the order decoders take them.
PROMPT_KEYS = ("attention_mask", "segment_ids", "context_mask", "segment_rel", "ext_table_ids", "ext_table_sub")


class CpmBeeDecoder:
    """A decode back-end of `cpmbee_beam_search`: ``prefill`` writes the prompt into ``cache`` once per sample and
    lays out ``beam_size`` rows per sample, ``step`` feeds one token per row and returns its logits, ``reorder``
    makes row ``i`` continue row ``index[i]`` (a beam taking another beam's place)."""

    model = None
    cache = None

    def prefill(self, prompt: dict, beam_size: int) -> torch.Tensor:
        """``prompt``: ``input_ids`` or ``inputs_embeds`` and the `PROMPT_KEYS` tensors, one row per sample (the
        beams of a sample share its prompt). Returns the last prompt position's logits, one row per beam."""
        outputs = self.model(**prompt, cache=self.cache, use_cache=True, logits_to_keep=1)
        self._spread(beam_size)
        rows = [None if prompt[key] is None else prompt[key].repeat_interleave(beam_size, dim=0) for key in PROMPT_KEYS]
        self.start(prompt["attention_mask"].shape[1], *rows)
        return outputs.logits[:, -1].float().repeat_interleave(beam_size, dim=0)

    def _spread(self, beam_size: int) -> None:
        """Give every beam its sample's prompt keys."""

    def start(self, prompt_length, attention_mask, segment_ids, context_mask, segment_rel, ext_table_ids,
              ext_table_sub) -> None:
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reorder(self, index: torch.Tensor) -> None:
        raise NotImplementedError


class CpmBeeDynamicDecoder(CpmBeeDecoder):
    """The reference back-end: a growing `DynamicCache`, and per-token inputs that grow by one column per step."""

    def __init__(self, model, rows: int):
        self.model = model
        self.rows = rows
        self.cache = DynamicCache(config=model.config)

    def _spread(self, beam_size: int) -> None:
        self.cache.batch_repeat_interleave(beam_size)

    def start(self, prompt_length, attention_mask, segment_ids, context_mask, segment_rel, ext_table_ids,
              ext_table_sub) -> None:
        self.attention_mask, self.segment_ids, self.context_mask = attention_mask, segment_ids, context_mask
        self.fixed = dict(segment_rel=segment_rel, ext_table_ids=ext_table_ids, ext_table_sub=ext_table_sub)

    def step(self, tokens: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        # A fed token is attended (not padding), continues its answer segment, and is not context.
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones((self.rows, 1))], dim=1)
        self.segment_ids = torch.cat([self.segment_ids, segments[:, None]], dim=1)
        self.context_mask = torch.cat([self.context_mask, self.context_mask.new_zeros((self.rows, 1))], dim=1)
        outputs = self.model(
            input_ids=tokens[:, None], attention_mask=self.attention_mask, segment_ids=self.segment_ids,
            context_mask=self.context_mask, **self.fixed, cache=self.cache, use_cache=True,
        )
        return outputs.logits[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        # Rows only take the place of rows of the same sample: padding and context flags agree already.
        self.cache.reorder_cache(index)
        self.segment_ids = self.segment_ids[index]


class CpmBeeStaticKV:
    """Key/value buffers of fixed size ``[rows, heads, max_length, head_dim]`` per layer.

    It has the two methods the attention layers call on a cache (``update`` and ``get_seq_length``). Each layer's
    buffers are made from its first keys (so they follow that layer's device and compute dtype, whatever the
    weights are stored as: quantized, offloaded, or spread over devices). ``position`` (a 0-dim tensor on the
    device) is the slot the next token is written to; keeping it on the device lets a captured step advance it
    without a host sync."""

    def __init__(self, config, rows: int, max_length: int, device):
        self.max_length = max_length
        self.shape = (rows, config.num_attention_heads, max_length, config.head_dim)
        self.keys = [None] * config.num_hidden_layers
        self.values = [None] * config.num_hidden_layers
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.length = 0  # the same count, kept on the host for the prompt step
        self.fixed_shape = False  # set by the decoder once the prompt is in

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the new keys at ``position``. The prompt step may give one row per sample for several rows per
        sample (beams): each row gets its sample's keys. It returns the written slots only; the decode steps
        (``fixed_shape``) get the whole buffers."""
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = key.new_zeros(self.shape), value.new_zeros(self.shape)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        spread = keys.shape[0] // key.shape[0]
        slots = self.position.to(keys.device) + torch.arange(key.shape[-2], device=keys.device)
        keys.index_copy_(2, slots, key.repeat_interleave(spread, dim=0) if spread > 1 else key)
        values.index_copy_(2, slots, value.repeat_interleave(spread, dim=0) if spread > 1 else value)
        if self.fixed_shape:
            return keys, values
        if spread > 1:  # the prompt, one row per sample: it attends to itself only
            return key, value
        end = self.length + key.shape[-2]
        return keys[:, :, :end], values[:, :, :end]

    def reorder_cache(self, index: torch.Tensor, start: int = 0) -> None:
        """Keep the rows ``index`` of the written slots from ``start`` on (the slots before ``start`` must already
        agree between each row and the row it takes)."""
        for buffer in (*self.keys, *self.values):
            if buffer is not None:
                written = buffer[:, :, start:self.length]
                written.copy_(written.index_select(0, index.to(buffer.device)))


class CpmBeeStaticDecoder(CpmBeeDecoder):
    """The single-token decode step of `cpmbee_beam_search` with every tensor shape fixed for the whole answer.

    Keys live in `CpmBeeStaticKV`; each step writes slot ``position`` and attends to all ``max_length`` slots,
    with the position-bias row of the new token computed from the slot metadata (segment of every slot, context
    and padding flags) and unwritten slots hidden. Because nothing depends on the host-side length, the step can
    be compiled once (``mode="compile"``) or captured and replayed as a CUDA graph (``mode="cuda_graph"``, which
    removes the per-kernel launch cost that dominates a batch-1 decode step). ``mode="static"`` runs it eagerly.
    The logits equal the dynamic-cache path up to float summation order (the softmax spans the hidden slots too).
    """

    def __init__(self, model, rows: int, max_length: int, mode: str = "static", device=None):
        if mode not in DECODE_MODES[1:]:
            raise ValueError(f"decode mode must be one of {DECODE_MODES}, got {mode!r}")
        device = torch.device(device) if device is not None else model.device
        if mode == "cuda_graph" and device.type != "cuda":
            raise ValueError("decode_mode='cuda_graph' needs the model on a CUDA device; use 'static' or 'compile'")
        check_static_buffers(model, rows, max_length, device, mode)
        self.model = model
        self.mode = mode
        self.rows = rows
        self.device = device
        self.cache = CpmBeeStaticKV(model.config, rows, max_length, device)
        self.graph = None

    def start(self, prompt_length: int, attention_mask, segment_ids, context_mask, segment_rel, ext_table_ids,
              ext_table_sub) -> None:
        """Record the prompt's slot metadata after its keys were written by a forward with ``cache=self.cache``."""
        device = self.device
        length, rows = self.cache.max_length, self.rows
        self.prompt_length = self.cache.length = prompt_length
        self.cache.position.fill_(prompt_length)
        self.cache.fixed_shape = True

        def slots(prompt_part, fill):
            full = torch.full((rows, length), fill, dtype=torch.long, device=device)
            full[:, :prompt_length] = prompt_part
            return full

        self.key_segment = slots(segment_ids, 0)
        self.key_context = slots(context_mask, 0).bool()
        self.key_valid = slots(attention_mask, 1).bool()
        # Without a relation table every pair is "same segment" (relation 0), as in the model's forward.
        self.segment_rel = None if segment_rel is None else segment_rel.reshape(rows, -1).clone()
        self.num_segments = 0 if segment_rel is None else segment_rel.shape[-1]
        self.slot_index = torch.arange(length, device=device)
        # Own copies, one row per beam: `reorder` permutes them in place.
        self.ext_table_ids = None if ext_table_ids is None else ext_table_ids.expand(rows, -1).clone()
        self.ext_table_sub = None if ext_table_sub is None else ext_table_sub.expand(rows, -1).clone()
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.segments = torch.zeros(rows, dtype=torch.long, device=device)
        self._run = self._step
        if self.mode == "compile":
            self._run = torch.compile(self._step, dynamic=False, fullgraph=True)
        elif self.mode == "cuda_graph":
            self._capture()

    def _step(self) -> torch.Tensor:
        """One token per row (``self.tokens`` in segments ``self.segments``) written at ``position``; logits out."""
        inner = self.model.model
        position = self.cache.position
        slot = position.view(1)
        self.key_segment.index_copy_(1, slot, self.segments[:, None])
        if self.segment_rel is None:
            relation = torch.zeros_like(self.key_segment)
        else:
            relation = torch.gather(self.segment_rel, 1, self.segments[:, None] * self.num_segments + self.key_segment)
        position_bias = inner.position_bias(slot, self.slot_index, relation[:, None, :])
        embeds = inner.embed(self.tokens[:, None], self.ext_table_ids, self.ext_table_sub, validate=False)
        position_bias = position_bias.to(embeds.dtype)
        visible = (self.key_context | (self.slot_index <= position)) & self.key_valid
        hidden_states = inner.run_layers(embeds, position_bias, visible[:, None, :], cache=self.cache)
        logits = self.model.compute_logits(hidden_states, self.ext_table_ids, self.ext_table_sub)
        position.add_(1)
        return logits[:, -1]

    def _capture(self) -> None:
        # Warm up on a side stream (lazy kernel and workspace set-up must not be captured). The warm-up steps write
        # slot `position`, which the first real step overwrites, so only the counter needs winding back.
        warmups = 2
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmups):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.cache.position.sub_(warmups)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._graph_logits = self._step()  # recorded only: the counter advances at each replay
        self._run = self._replay

    def _replay(self) -> torch.Tensor:
        self.graph.replay()
        return self._graph_logits

    def step(self, tokens: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (raw ids, in answer segments ``segments``); returns ``[rows, vocab + ext]``."""
        if self.cache.length >= self.cache.max_length:
            raise RuntimeError(f"the static decoder holds {self.cache.max_length} tokens and is full")
        self.tokens.copy_(tokens)
        self.segments.copy_(segments)
        self.cache.length += 1
        logits = self._run()
        return logits.clone() if self.graph is not None else logits

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the rows ``index`` (beam reordering), in place so a captured graph keeps its buffers.

        Beams only ever take the place of beams of the same sample, whose prompt keys are the same, so only the
        answer slots are copied: the cost of a reordering does not grow with the prompt."""
        self.cache.reorder_cache(index, start=self.prompt_length)
        index = index.to(self.key_segment.device)
        for tensor in (self.key_segment, self.key_context, self.key_valid, self.segment_rel, self.ext_table_ids,
                       self.ext_table_sub):
            if tensor is not None:
                tensor.copy_(tensor.index_select(0, index))


# -- the original beam search ------------------------------------------------------------------------------------


class _Hypotheses:
    """Finished answers of one sample, the best ``size`` kept, scored ``sum_logprob / len ** length_penalty``.

    An item is ``(score, tokens, rows)``: the generated ``(raw id, answer slot)`` pairs and, per token, the row
    (``sample * beam_size + beam``) it was chosen from."""

    def __init__(self, size: int, length_penalty: float):
        self.size = size
        self.length_penalty = length_penalty
        self.items: list[tuple[float, list, list]] = []
        self.worst = 1e9

    def add(self, tokens: list, rows: list, sum_logprob: float) -> None:
        score = sum_logprob / len(tokens) ** self.length_penalty
        if len(self.items) < self.size or score > self.worst:
            self.items.append((score, tokens, rows))
            if len(self.items) > self.size:
                ranked = sorted((item[0], i) for i, item in enumerate(self.items))
                del self.items[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum_logprob: float, step: int) -> bool:
        if len(self.items) < self.size:
            return False
        return self.worst >= best_sum_logprob / step**self.length_penalty

    def ranked(self) -> list[tuple[float, list, list]]:
        """The items, best first (ties keep the order they were found in)."""
        return sorted(self.items, key=lambda item: -item[0])


@dataclass
class _Beam:
    """A live beam: the answer slot it is filling, its tokens so far and the rows they were chosen from."""

    slot: int = 0
    tokens: list = field(default_factory=list)
    rows: list = field(default_factory=list)


@dataclass
class _Selection:
    """The next step's rows: row ``i`` continues row ``index[i]`` with ``tokens[i]`` (in answer segment
    ``segments[i]``), at beam score ``scores[i]``."""

    index: list[int]
    scores: list[float]
    tokens: list[int]
    segments: list[int]


class _SearchState:
    """Per-sample bookkeeping of the original beam search: live beams, finished hypotheses, done flags. ``eos`` is
    the set of ids that close an answer slot (empty: slots never close; answers end at the length limit)."""

    def __init__(self, answer_segments: list[list[int]], beam_size: int, length_penalty: float, eos: set, bos: int,
                 pad: int):
        self.answer_segments = answer_segments
        self.beam_size = beam_size
        self.eos, self.bos, self.pad = eos, bos, pad
        self.beams = [[_Beam() for _ in range(beam_size)] for _ in answer_segments]
        self.hypotheses = [_Hypotheses(beam_size, length_penalty) for _ in answer_segments]
        self.done = [False] * len(answer_segments)


def select_candidates(state: _SearchState, top_scores: list, top_ids: list, width: int, step: int,
                      final: bool) -> _Selection | None:
    """The original's choice of next beams, from each sample's top ``2 * beam_size`` candidates (``top_scores`` /
    ``top_ids``: per sample, best first; an id is ``beam * width + token``).

    A candidate that closes the last answer slot with ``</s>`` (or any candidate at the ``final`` step) becomes a
    finished hypothesis; ``</s>`` in an earlier slot continues with ``<s>`` in the next slot's segment; otherwise
    the token continues the beam's slot. The first ``beam_size`` continuing candidates are kept. A sample is done
    once no live beam can beat its worst kept hypothesis; its rows then feed padding. Returns None at the final
    step (nothing continues)."""
    beam_size, selection, new_beams = state.beam_size, _Selection([], [], [], []), []
    for sample, (scores, ids) in enumerate(zip(top_scores, top_ids)):
        hypotheses = state.hypotheses[sample]
        state.done[sample] = state.done[sample] or hypotheses.is_done(max(scores), step)
        if state.done[sample]:
            rows = range(sample * beam_size, (sample + 1) * beam_size)
            _extend(selection, rows, [0.0] * beam_size, [state.pad] * beam_size, [0] * beam_size)
            new_beams.append([_Beam() for _ in range(beam_size)])
            continue
        slots, chosen = state.answer_segments[sample], []
        for flat_id, value in zip(ids, scores):
            beam, word = divmod(flat_id, width)
            live, row = state.beams[sample][beam], sample * beam_size + beam
            tokens, rows = live.tokens + [(word, live.slot)], live.rows + [row]
            if final or (word in state.eos and live.slot + 1 == len(slots)):
                hypotheses.add(tokens, rows, value)
                continue
            slot, token = (live.slot + 1, state.bos) if word in state.eos else (live.slot, word)
            chosen.append((_Beam(slot, tokens, rows), value, row, token, slots[slot]))
            if len(chosen) == beam_size:
                break
        if final:
            continue
        new_beams.append([item[0] for item in chosen])
        _extend(selection, *([item[i] for item in chosen] for i in (2, 1, 3, 4)))
    if final:
        return None
    state.beams = new_beams
    return selection


def _extend(selection: _Selection, index, scores, tokens, segments) -> None:
    selection.index.extend(index)
    selection.scores.extend(scores)
    selection.tokens.extend(tokens)
    selection.segments.extend(segments)


def _vocab_rule_mask(config, rows: int, beam_size: int, ext_size: int, ext_table_mask, unk_allowed, device):
    """``[rows, vocab + ext]``, True where the original's vocabulary rule forbids a token: ``<unk>`` unless the
    sample's input had an out-of-vocabulary piece, and ext-table entries of other samples."""
    mask = torch.zeros((rows, config.vocab_size + ext_size), dtype=torch.bool, device=device)
    if unk_allowed is not None:
        mask[:, config.unk_token_id] = ~unk_allowed.bool().to(device).repeat_interleave(beam_size, dim=0)
    else:
        mask[:, config.unk_token_id] = True
    if ext_size and ext_table_mask is not None:
        mask[:, config.vocab_size:] = ~ext_table_mask.bool().to(device).repeat_interleave(beam_size, dim=0)
    return mask


def _make_decoder(model, decode_mode: str, rows: int, prompt_length: int, last_step: int, device) -> CpmBeeDecoder:
    if decode_mode == "dynamic":
        return CpmBeeDynamicDecoder(model, rows)
    # At most `last_step` tokens are fed after the prompt. Rounding the buffers up lets prompts of similar length
    # share one compiled step (a compiled step is specialised to its shapes).
    slots = prompt_length + last_step + 1
    slots = -(-slots // STATIC_SLOTS_MULTIPLE) * STATIC_SLOTS_MULTIPLE
    return CpmBeeStaticDecoder(model, rows, slots, mode=decode_mode, device=device)


@dataclass
class BeamSearchOutput:
    """What `run_beam_search` found: per sample, its finished hypotheses; per step, the log-probabilities the
    selection used (``[rows, vocab + ext]``, before the beam scores are added) and the raw logits, when asked for;
    the decoder's cache after the last step."""

    hypotheses: list[_Hypotheses]
    scores: tuple | None = None
    logits: tuple | None = None
    cache: object = None


@torch.no_grad()
def run_beam_search(model, prompt: dict, answer_segments: list[list[int]], *, beam_size: int, last_step: int,
                    repetition_penalty: float, length_penalty: float, temperature: float, eos: set, bos: int,
                    pad: int, decode_mode: str = "dynamic", ext_table_mask=None, unk_allowed=None,
                    output_scores: bool = False, output_logits: bool = False) -> BeamSearchOutput:
    """The original's search loop. ``prompt``: ``input_ids`` or ``inputs_embeds`` and the `PROMPT_KEYS` tensors, one
    row per sample (all given). An answer gets at most ``last_step + 1`` tokens. Each step masks the vocabulary rule,
    applies the repetition penalty over the answer so far (its ``<s>`` included), divides by the temperature, adds
    the beam scores to the log-probabilities and selects the next beams (see `select_candidates`)."""
    batch, prompt_length = prompt["attention_mask"].shape
    if len(answer_segments) != batch or any(len(slots) == 0 for slots in answer_segments):
        raise ValueError("answer_segments needs a non-empty list of segment ids for every sample")
    device, config = prompt["attention_mask"].device, model.config
    rows, ext_table_ids = batch * beam_size, prompt["ext_table_ids"]
    ext_size = 0 if ext_table_ids is None else ext_table_ids.shape[-1]
    row_ext_ids = None if ext_table_ids is None else ext_table_ids.repeat_interleave(beam_size, dim=0)
    vocab_mask = _vocab_rule_mask(config, rows, beam_size, ext_size, ext_table_mask, unk_allowed, device)
    state = _SearchState(answer_segments, beam_size, length_penalty, eos, bos, pad)
    decoder = _make_decoder(model, decode_mode, rows, prompt_length, last_step, device)
    output = BeamSearchOutput(state.hypotheses, () if output_scores else None, () if output_logits else None)
    logits = decoder.prefill(prompt, beam_size)
    fed = torch.full((rows, 1), bos, dtype=torch.long, device=device)  # answer tokens fed (base ids)
    beam_scores = torch.zeros((batch, beam_size), device=device)
    beam_scores[:, 1:] = -1e9
    beam_scores = beam_scores.view(-1)
    for step in range(last_step + 1):
        if step > 0:
            logits = decoder.step(tokens, segments).float()
        if all(state.done):
            break
        if output_logits:
            output.logits += (logits.clone(),)
        processed = apply_answer_repetition_penalty(logits.masked_fill(vocab_mask, MASKED_LOGIT), fed,
                                                    repetition_penalty)
        log_probs = F.log_softmax(processed / temperature, dim=-1)
        if output_scores:
            output.scores += (log_probs.clone(),)
        candidates = (log_probs + beam_scores[:, None]).view(batch, -1)
        top_scores, top_ids = torch.topk(candidates, 2 * beam_size, dim=1, largest=True, sorted=True)
        selection = select_candidates(state, top_scores.tolist(), top_ids.tolist(), logits.shape[-1], step,
                                      final=step == last_step)
        if selection is None:
            break
        index = torch.tensor(selection.index, device=device)
        beam_scores = torch.tensor(selection.scores, device=device)
        tokens = torch.tensor(selection.tokens, dtype=torch.long, device=device)
        segments = torch.tensor(selection.segments, dtype=torch.long, device=device)
        fed = torch.cat([fed[index], base_ids(tokens[:, None], row_ext_ids, config.vocab_size)], dim=1)
        if selection.index != list(range(rows)):  # always unchanged with one beam: nothing to move
            decoder.reorder(index)
    output.cache = decoder.cache
    return output


def prompt_inputs(input_ids, attention_mask=None, segment_ids=None, context_mask=None, segment_rel=None,
                  ext_table_ids=None, ext_table_sub=None, inputs_embeds=None) -> dict:
    """The prompt of `run_beam_search`, missing per-token inputs filled in: no padding, one segment, all
    context (the original's prompt is context)."""
    batch, prompt_length = input_ids.shape
    ones = torch.ones((batch, prompt_length), dtype=torch.long, device=input_ids.device)
    return dict(
        input_ids=None if inputs_embeds is not None else input_ids, inputs_embeds=inputs_embeds,
        attention_mask=ones if attention_mask is None else attention_mask,
        segment_ids=ones * 0 if segment_ids is None else segment_ids,
        context_mask=ones if context_mask is None else context_mask,
        segment_rel=segment_rel, ext_table_ids=ext_table_ids, ext_table_sub=ext_table_sub,
    )


def default_answer_segments(segment_ids, batch: int) -> list[list[int]]:
    """One answer slot per sample: the segment of the prompt's final ``<s>``."""
    segments = [0] * batch if segment_ids is None else segment_ids[:, -1].tolist()
    return [[int(segment)] for segment in segments]


@dataclass
class OriginalSearch:
    """The original beam search's settings for one `generate()` call, read from a generation config, and the
    transformers output built from what it found (see `VisCPMChatForConditionalGeneration.generate`)."""

    beam_size: int
    last_step: int
    repetition_penalty: float
    length_penalty: float
    temperature: float
    eos: set
    bos: int
    pad: int
    decode_mode: str
    num_return_sequences: int

    @classmethod
    def from_config(cls, config, text_config, prompt_length: int, temperature) -> "OriginalSearch":
        """``max_new_tokens`` (else ``max_length`` minus the prompt, else transformers' default of 20) caps the new
        tokens; ``original_max_length`` is the original's own limit (its beams close one step after counting
        ``original_max_length + 1`` tokens)."""
        if config.max_new_tokens is not None:
            cap = config.max_new_tokens
        elif config.max_length is not None:
            cap = config.max_length - prompt_length
            if cap < 1:
                raise ValueError(f"max_length={config.max_length} leaves no room after the prompt's {prompt_length} "
                                 "tokens: pass max_new_tokens instead")
        else:
            cap = 20
        last_step = cap - 1
        if getattr(config, "original_max_length", None) is not None:
            last_step = min(last_step, config.original_max_length + 1)
        eos = config.eos_token_id
        eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        beam_size = config.num_beams or 1
        num_return_sequences = config.num_return_sequences or 1
        if num_return_sequences > beam_size:
            raise ValueError(f"num_return_sequences ({num_return_sequences}) must be at most num_beams ({beam_size})")
        decode_mode = getattr(config, "decode_mode", None) or "dynamic"
        if decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {DECODE_MODES}, got {decode_mode!r}")
        return cls(
            beam_size=beam_size, last_step=last_step,
            repetition_penalty=1.0 if config.repetition_penalty is None else config.repetition_penalty,
            length_penalty=1.0 if config.length_penalty is None else config.length_penalty,
            temperature=1.0 if temperature is None else temperature, eos=eos,
            bos=text_config.bos_token_id if config.bos_token_id is None else config.bos_token_id,
            pad=config.pad_token_id if config.pad_token_id is not None else min(eos, default=text_config.pad_token_id),
            decode_mode=decode_mode, num_return_sequences=num_return_sequences,
        )

    def arguments(self) -> dict:
        """The keyword arguments of `run_beam_search`."""
        return dict(beam_size=self.beam_size, last_step=self.last_step, repetition_penalty=self.repetition_penalty,
                    length_penalty=self.length_penalty, temperature=self.temperature, eos=self.eos, bos=self.bos,
                    pad=self.pad, decode_mode=self.decode_mode)

    def outputs(self, input_ids: torch.Tensor, found: BeamSearchOutput, config):
        """The prompt followed by the best ``num_return_sequences`` answers of each sample (their tokens, each slot's
        ``</s>`` included, right-padded), or with ``return_dict_in_generate`` a `GenerateBeamDecoderOnlyOutput`."""
        best = [item for hypotheses in found.hypotheses for item in hypotheses.ranked()[: self.num_return_sequences]]
        width = max(len(tokens) for _, tokens, _ in best)
        new = torch.tensor([[word for word, _ in tokens] + [self.pad] * (width - len(tokens)) for _, tokens, _ in best],
                           dtype=torch.long, device=input_ids.device).view(len(best), width)
        sequences = torch.cat([input_ids.repeat_interleave(self.num_return_sequences, dim=0), new], dim=1)
        if not config.return_dict_in_generate:
            return sequences
        beam_indices = torch.tensor([rows + [-1] * (width - len(rows)) for _, _, rows in best], dtype=torch.long,
                                    device=input_ids.device).view(len(best), width)
        scores = torch.tensor([score for score, _, _ in best], device=input_ids.device)
        return GenerateBeamDecoderOnlyOutput(
            sequences=sequences, sequences_scores=scores if config.output_scores else None, scores=found.scores,
            logits=found.logits, beam_indices=beam_indices,
            cache=found.cache if isinstance(found.cache, Cache) else None,
        )


@torch.no_grad()
def cpmbee_beam_search(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    segment_ids: torch.LongTensor | None = None,
    context_mask: torch.Tensor | None = None,
    segment_rel: torch.LongTensor | None = None,
    ext_table_ids: torch.LongTensor | None = None,
    ext_table_sub: torch.LongTensor | None = None,
    ext_table_mask: torch.Tensor | None = None,
    unk_allowed: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    answer_segments: list[list[int]] | None = None,
    beam_size: int = 3,
    max_length: int = 100,
    repetition_penalty: float = 1.0,
    length_penalty: float = 1.0,
    temperature: float = 1.0,
    decode_mode: str = "dynamic",
) -> list[list[list[int]]]:
    """The original CPM-Bee beam search over a `CpmBeeForCausalLM` (or a model exposing the same forward).

    The inputs are a `CpmBeeTokenizer` encoding in the generation layout (the prompt ends with the first
    answer segment's ``<s>``). ``answer_segments`` lists, per sample, the segment ids of its answer slots
    in order (default: the one segment of the final ``<s>``); when one slot ends with ``</s>``, the next
    starts with ``<s>``. ``max_length`` is the original's length argument (an answer may run a token or
    two past it, as in the original). Returns, per sample, the raw token ids of each answer slot, without
    the closing ``</s>``; decode them with the tokenizer.

    ``decode_mode``: ``"dynamic"`` (a growing `DynamicCache`; the reference path), or a `CpmBeeStaticDecoder`
    mode: ``"static"`` (fixed-shape step, eager), ``"compile"`` (that step through `torch.compile`) or
    ``"cuda_graph"`` (that step replayed as a CUDA graph). The static modes need a `CpmBeeForCausalLM` as ``model``.
    """
    if decode_mode not in DECODE_MODES:
        raise ValueError(f"decode_mode must be one of {DECODE_MODES}, got {decode_mode!r}")
    check_original_settings(beam_size, max_length, repetition_penalty, length_penalty, temperature)
    config = model.config
    batch = input_ids.shape[0]
    if answer_segments is None:
        answer_segments = default_answer_segments(segment_ids, batch)
    prompt = prompt_inputs(input_ids, attention_mask, segment_ids, context_mask, segment_rel, ext_table_ids,
                           ext_table_sub, inputs_embeds)
    eos = {config.eos_token_id}
    found = run_beam_search(
        model, prompt, answer_segments, beam_size=beam_size,
        last_step=max_length + 1,  # the original counts `max_length + 1` answer tokens and closes one step later
        repetition_penalty=repetition_penalty, length_penalty=length_penalty, temperature=temperature, eos=eos,
        bos=config.bos_token_id, pad=config.pad_token_id, decode_mode=decode_mode, ext_table_mask=ext_table_mask,
        unk_allowed=unk_allowed,
    )
    return [answer_slots(hypotheses.ranked()[0][1], len(slots), eos)
            for hypotheses, slots in zip(found.hypotheses, answer_segments)]


def answer_slots(tokens: list, count: int, eos: set) -> list[list[int]]:
    """``(raw id, slot)`` pairs to one id list per answer slot, each without its closing ``</s>``."""
    per_slot = [[] for _ in range(count)]
    for word, slot in tokens:
        per_slot[slot].append(word)
    return [slot[:-1] if slot and slot[-1] in eos else slot for slot in per_slot]


__all__ = [
    "add_vocab_rule",
    "CpmBeeDecoder",
    "CpmBeeDynamicDecoder",
    "CpmBeeStaticDecoder",
    "CpmBeeStaticKV",
    "CpmBeeRepetitionPenaltyLogitsProcessor",
    "CpmBeeVocabMaskLogitsProcessor",
    "apply_answer_repetition_penalty",
    "cpmbee_beam_search",
    "select_candidates",
]
