"""Decoding rules of the original CPM-Bee / VisCPM code, for exact reproduction of its answers.

* `CpmBeeVocabMaskLogitsProcessor`: a row may produce only its own ext-table entries, and ``<unk>`` only
  when its input contained an out-of-vocabulary piece (both set to -10000, as the original does).
* `CpmBeeRepetitionPenaltyLogitsProcessor`: CTRL-style penalty over the tokens of the answer only
  (the answer's ``<s>`` included, ext tokens counted by their base id), not over the prompt.
* `cpmbee_beam_search`: the original beam search, step for step: temperature inside beam search, the top
  ``2 * beams`` candidates per step, hypotheses scored ``sum_logprob / len ** length_penalty``, several
  answer segments filled one after another, and the original's length limit and stopping rule.
* `CpmBeeStaticDecoder`: the decode step of that search over preallocated buffers, with every shape fixed for
  the whole answer, so the step can be compiled once or replayed as a CUDA graph (``decode_mode``).

The standard ``model.generate()`` (greedy, sampling, transformers' beam search) remains available; these
pieces are what VisCPM-Chat uses to give the same answer as the original for the same checkpoint.
"""

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicCache

MASKED_LOGIT = -10000.0


def _rows(tensor: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Repeat a per-sample tensor for the beams/samples that generate() laid out per row."""
    if tensor.shape[0] == num_rows:
        return tensor
    if num_rows % tensor.shape[0]:
        raise ValueError(f"cannot spread {tensor.shape[0]} samples over {num_rows} rows")
    return tensor.repeat_interleave(num_rows // tensor.shape[0], dim=0)


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
        if penalty < 1.0:
            raise ValueError(f"repetition_penalty must be >= 1, got {penalty}")
        self.penalty = penalty
        self.start = prompt_length - 1
        self.vocab_size = vocab_size
        self.ext_table_ids = ext_table_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        answer = base_ids(input_ids[:, self.start:], self.ext_table_ids, self.vocab_size)
        return apply_answer_repetition_penalty(scores, answer, self.penalty)


class _Hypotheses:
    """Finished answers of one sample, the best ``size`` kept, scored ``sum_logprob / len ** length_penalty``."""

    def __init__(self, size: int, length_penalty: float):
        self.size = size
        self.length_penalty = length_penalty
        self.items: list[tuple[float, list]] = []
        self.worst = 1e9

    def add(self, tokens: list, sum_logprob: float) -> None:
        score = sum_logprob / len(tokens) ** self.length_penalty
        if len(self.items) < self.size or score > self.worst:
            self.items.append((score, tokens))
            if len(self.items) > self.size:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.items))
                del self.items[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum_logprob: float, step: int) -> bool:
        if len(self.items) < self.size:
            return False
        return self.worst >= best_sum_logprob / step**self.length_penalty

    def best(self) -> list:
        return max(self.items, key=lambda item: item[0])[1]


DECODE_MODES = ("dynamic", "static", "compile", "cuda_graph")
STATIC_SLOTS_MULTIPLE = 128


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


class CpmBeeStaticDecoder:
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
    **unused,
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
    if repetition_penalty < 1.0:
        raise ValueError(f"repetition_penalty must be >= 1, got {repetition_penalty}")
    if beam_size < 1 or max_length < 1:
        raise ValueError(f"beam_size and max_length must be at least 1, got {beam_size} and {max_length}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    config = model.config
    vocab_size, eos, bos = config.vocab_size, config.eos_token_id, config.bos_token_id
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    if answer_segments is None:
        if segment_ids is None:
            answer_segments = [[0]] * batch
        else:
            answer_segments = [[int(s)] for s in segment_ids[:, -1].tolist()]
    if len(answer_segments) != batch or any(len(slots) == 0 for slots in answer_segments):
        raise ValueError("answer_segments needs a non-empty list of segment ids for every sample")
    max_length += 1
    rows = batch * beam_size

    def expand(tensor):
        return None if tensor is None else tensor.repeat_interleave(beam_size, dim=0)

    ones = torch.ones((batch, prompt_len), dtype=torch.long, device=device)
    prompt = dict(
        attention_mask=attention_mask if attention_mask is not None else ones,
        segment_ids=segment_ids if segment_ids is not None else ones * 0,
        context_mask=context_mask if context_mask is not None else ones,
        segment_rel=segment_rel, ext_table_ids=ext_table_ids, ext_table_sub=ext_table_sub,
    )
    attention_mask, segment_ids, context_mask = (expand(prompt[key]) for key in ("attention_mask", "segment_ids",
                                                                                 "context_mask"))
    segment_rel, ext_table_ids, ext_table_sub = expand(segment_rel), expand(ext_table_ids), expand(ext_table_sub)
    ext_size = 0 if ext_table_ids is None else ext_table_ids.shape[-1]

    # The original's vocabulary rule, as one additive row per beam.
    vocab_mask = torch.zeros((rows, vocab_size + ext_size), device=device)
    unk_ok = expand(unk_allowed.bool()).to(device) if unk_allowed is not None else torch.zeros(
        rows, dtype=torch.bool, device=device)
    vocab_mask[:, config.unk_token_id] = (~unk_ok).float()
    if ext_size:
        own = expand(ext_table_mask.bool()) if ext_table_mask is not None else torch.ones(
            (rows, ext_size), dtype=torch.bool, device=device)
        vocab_mask[:, vocab_size:] = (~own.to(device)).float()
    masked_positions = vocab_mask.bool()

    decoder = None
    if decode_mode == "dynamic":
        cache = DynamicCache(config=config)
    else:
        # The loop below feeds at most max_length + 1 tokens after the prompt. Rounding the buffers up lets prompts
        # of similar length share one compiled step (a compiled step is specialised to its shapes).
        slots = prompt_len + max_length + 1
        decoder = CpmBeeStaticDecoder(model, rows, -(-slots // STATIC_SLOTS_MULTIPLE) * STATIC_SLOTS_MULTIPLE,
                                      mode=decode_mode, device=device)
        cache = decoder.cache
    # The beams of a sample share its prompt: prefill each sample once, then give every beam its keys.
    outputs = model(
        input_ids=None if inputs_embeds is not None else input_ids, inputs_embeds=inputs_embeds, **prompt,
        cache=cache, use_cache=True, logits_to_keep=1,
    )
    cache = outputs.cache
    logits = expand(outputs.logits[:, -1].float())
    if decoder is None:
        cache.batch_repeat_interleave(beam_size)
    else:
        decoder.start(prompt_len, attention_mask, segment_ids, context_mask, segment_rel, ext_table_ids,
                      ext_table_sub)

    fed = torch.full((rows, 1), bos, dtype=torch.long, device=device)  # answer tokens fed so far (base ids)
    beam_scores = torch.zeros((batch, beam_size), device=device)
    beam_scores[:, 1:] = -1e9
    beam_scores = beam_scores.view(-1)
    hypotheses = [_Hypotheses(beam_size, length_penalty) for _ in range(batch)]
    done = [False] * batch
    states = [[{"slot": 0, "tokens": []} for _ in range(beam_size)] for _ in range(batch)]

    next_tokens = None
    for step in range(max_length + 1):
        if step > 0 and decoder is not None:
            logits = decoder.step(next_tokens, next_segments).float()
        elif step > 0:
            outputs = model(
                input_ids=next_tokens[:, None], attention_mask=attention_mask, segment_ids=segment_ids,
                context_mask=context_mask, segment_rel=segment_rel, ext_table_ids=ext_table_ids,
                ext_table_sub=ext_table_sub, cache=cache, use_cache=True,
            )
            cache = outputs.cache
            logits = outputs.logits[:, -1].float()
        if all(done):
            break

        logits = logits.masked_fill(masked_positions, MASKED_LOGIT)
        logits = apply_answer_repetition_penalty(logits, fed, repetition_penalty)
        scores = F.log_softmax(logits / temperature, dim=-1)
        width = scores.shape[-1]
        candidates = (scores + beam_scores[:, None]).view(batch, -1)
        top_scores, top_ids = torch.topk(candidates, 2 * beam_size, dim=1, largest=True, sorted=True)
        top_scores, top_ids = top_scores.tolist(), top_ids.tolist()

        reorder, new_scores, new_states, tokens, segments = [], [], [], [], []
        for sample in range(batch):
            done[sample] = done[sample] or hypotheses[sample].is_done(max(top_scores[sample]), step)
            if done[sample]:
                for beam in range(beam_size):
                    reorder.append(sample * beam_size + beam)
                    new_scores.append(0.0)
                    tokens.append(config.pad_token_id)
                    segments.append(0)
                new_states.append([{"slot": 0, "tokens": []}] * beam_size)
                continue
            slots = answer_segments[sample]
            chosen = []
            for flat_id, value in zip(top_ids[sample], top_scores[sample]):
                beam, word = divmod(flat_id, width)
                state = states[sample][beam]
                answer = state["tokens"] + [(word, state["slot"])]
                if (word == eos and state["slot"] + 1 == len(slots)) or step == max_length:
                    hypotheses[sample].add(answer, value)
                    continue
                if word == eos:
                    chosen.append(({"slot": state["slot"] + 1, "tokens": answer}, value, beam, bos,
                                   slots[state["slot"] + 1]))
                else:
                    chosen.append(({"slot": state["slot"], "tokens": answer}, value, beam, word,
                                   slots[state["slot"]]))
                if len(chosen) == beam_size:
                    break
            if step == max_length:
                continue
            new_states.append([item[0] for item in chosen])
            for _, value, beam, token, segment in chosen:
                reorder.append(sample * beam_size + beam)
                new_scores.append(value)
                tokens.append(token)
                segments.append(segment)
        if step == max_length:
            break

        states = new_states
        unchanged = reorder == list(range(rows))  # always so with one beam: nothing to move
        index = torch.tensor(reorder, device=device)
        beam_scores = torch.tensor(new_scores, device=device)
        next_tokens = torch.tensor(tokens, dtype=torch.long, device=device)
        next_segments = torch.tensor(segments, dtype=torch.long, device=device)
        fed = torch.cat([fed[index], base_ids(next_tokens[:, None], ext_table_ids, vocab_size)], dim=1)
        if decoder is not None:
            if not unchanged:
                decoder.reorder(index)
            continue
        if not unchanged:
            cache.reorder_cache(index)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((rows, 1))], dim=1)
        segment_ids = torch.cat([segment_ids[index], next_segments[:, None]], dim=1)
        context_mask = torch.cat([context_mask, context_mask.new_zeros((rows, 1))], dim=1)

    results = []
    for sample in range(batch):
        best = hypotheses[sample].best()
        per_slot = [[] for _ in answer_segments[sample]]
        for word, slot in best:
            per_slot[slot].append(word)
        for slot_tokens in per_slot:
            if slot_tokens and slot_tokens[-1] == eos:
                slot_tokens.pop()
        results.append(per_slot)
    return results


__all__ = [
    "add_vocab_rule",
    "CpmBeeStaticDecoder",
    "CpmBeeStaticKV",
    "CpmBeeRepetitionPenaltyLogitsProcessor",
    "CpmBeeVocabMaskLogitsProcessor",
    "apply_answer_repetition_penalty",
    "cpmbee_beam_search",
]
