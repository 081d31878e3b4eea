"""CPM-Bee against the original implementation: a tiny random original model is saved in the original
checkpoint format, converted with our converter, loaded with `from_pretrained`, and compared in fp32 (the oracle
tests; without the original, the others run on a stand-in checkpoint of the same format)."""

import copy

import originals
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import viscpm
from viscpm import CpmBeeForCausalLM
from viscpm.modeling.generation_cpmbee import cpmbee_beam_search

PROMPTS = [
    {"input": "今天天气不错，我们去公园散步吧。", "question": "What should we do? 𠀀𠀁 <<tag>", "<ans>": ""},
    {"caption": "a cat on a mat 😺", "<ans>": ""},
    {"context": {"title": "VisCPM", "body": "多模态大模型 𠀂 and <unk_2> 𠀀"}, "<ans>": ""},
]
GENERATION_KEYS = ("attention_mask", "segment_ids", "context_mask", "segment_rel", "ext_table_ids", "ext_table_sub")


@pytest.fixture(scope="module")
def pair(tmp_path_factory, vocab_file):
    """(original model or `originals.Missing`, our converted model, our tokenizer), with identical weights."""
    from viscpm.conversion.convert_cpmbee import convert_cpmbee_checkpoint

    original, state = originals.cpmbee_checkpoint(seed=0)
    root = tmp_path_factory.mktemp("cpmbee")
    checkpoint = root / "cpm-bee.pt"
    torch.save(state, checkpoint)
    config_file = root / "config.json"
    import json

    config_file.write_text(json.dumps(originals.TINY_ORIGINAL_CONFIG))
    convert_cpmbee_checkpoint(checkpoint, root / "hf", config=config_file, vocab_file=vocab_file, progress=False)
    model = AutoModelForCausalLM.from_pretrained(root / "hf", attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "hf")
    assert isinstance(model, CpmBeeForCausalLM)
    return original, model, tokenizer, root / "hf"


def _inputs(tokenizer, datas, **kwargs):
    return tokenizer(copy.deepcopy(datas), return_tensors="pt", padding=True, **kwargs)


def _real(attention_mask):
    return attention_mask.bool()


@pytest.mark.oracle
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_logits_match_original_batched(pair, implementation):
    from oracle import original_logits, original_prompt

    original, model, tokenizer, _ = pair
    model_inputs, _ = original_prompt(PROMPTS)
    expected = original_logits(original, model_inputs)
    inputs = _inputs(tokenizer, PROMPTS)
    model.config._attn_implementation = implementation
    try:
        with torch.no_grad():
            logits = model(**{k: inputs[k] for k in ("input_ids", *GENERATION_KEYS)}, use_cache=False).logits
    finally:
        model.config._attn_implementation = "eager"
    # Our prompt is the original's plus the answer's <s>; padding is on the left in both.
    prompt = logits[:, :-1]
    real = _real(inputs["attention_mask"][:, :-1])
    assert prompt.shape[-1] == expected.shape[-1]  # vocabulary + the same ext columns
    assert torch.allclose(prompt[real], expected[real], atol=1e-4, rtol=0)


@pytest.mark.oracle
def test_logits_match_original_one_by_one(pair):
    from oracle import original_logits, original_prompt

    original, model, tokenizer, _ = pair
    for data in PROMPTS:
        model_inputs, _ = original_prompt([data])
        expected = original_logits(original, model_inputs)[0]
        inputs = _inputs(tokenizer, [data])
        with torch.no_grad():
            logits = model(**{k: inputs[k] for k in ("input_ids", *GENERATION_KEYS)}).logits[0, :-1]
        assert torch.allclose(logits, expected, atol=1e-4, rtol=0)


def _original_training_batch(datas, max_len):
    from oracle import OriginalTokenizer, original_collater_item
    from VisCPM.utils.utils import CPMBeeCollater

    tokenizer = OriginalTokenizer()
    return CPMBeeCollater(tokenizer, max_len)([original_collater_item(tokenizer, data) for data in datas])


@pytest.mark.oracle
def test_training_forward_and_loss_match_original(pair):
    """The full sequence with answers in place (context tokens bidirectional, answers causal), as the
    original trains, with the original collater's targets."""
    original, model, tokenizer, _ = pair
    datas = [
        {"question": "1 + 1 = ?", "<ans>": "2 𠀀"},
        {"input": "天空是蓝色的", "<ans>": {"颜色": "蓝色", "en": "blue 𠀁𠀂"}},
    ]
    batch = _original_training_batch(datas, max_len=40)
    with torch.no_grad():
        expected, _ = original(
            batch["input_ids"], batch["input_id_subs"], batch["length"], batch["context"], batch["sample_ids"],
            batch["num_segments"], batch["segment_ids"], batch["segment_rel_offset"], batch["segment_rel"],
            batch["span"], batch["ext_table_ids"], batch["ext_table_sub"],
        )
    expected_loss = torch.nn.functional.cross_entropy(
        expected.reshape(-1, expected.shape[-1]), batch["target"].long().reshape(-1), ignore_index=-100
    )

    tokenizer.padding_side = "right"
    try:
        inputs = _inputs(tokenizer, datas, return_labels=True)
    finally:
        tokenizer.padding_side = "left"
    with torch.no_grad():
        out = model(**inputs)
    length = inputs["input_ids"].shape[1]
    assert not inputs["attention_mask"].bool().all()  # one row is padded on the right
    vocab = model.config.vocab_size
    # Ext columns may be ordered differently from the collater's; the vocabulary part must agree, padded
    # positions included (they see nothing, as in the original: Paint's UNet reads them).
    assert torch.allclose(out.logits[..., :vocab], expected[:, :length, :vocab], atol=1e-4, rtol=0)
    assert torch.allclose(out.loss, expected_loss, atol=1e-5)
    assert int((inputs["labels"] != -100).sum()) == int((batch["target"] != -100).sum())


def test_cached_decoding_equals_full_forward(pair):
    _, model, tokenizer, _ = pair
    inputs = _inputs(tokenizer, PROMPTS)
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    new_tokens = generated.shape[1] - inputs["input_ids"].shape[1]
    assert new_tokens == 6
    # Redo the whole sequence without a cache and check that each greedy choice is the argmax there.
    extended = {k: inputs[k] for k in GENERATION_KEYS}
    pad = torch.ones((len(PROMPTS), new_tokens), dtype=torch.long)
    extended["attention_mask"] = torch.cat([inputs["attention_mask"], pad], 1)
    extended["segment_ids"] = torch.cat([inputs["segment_ids"], inputs["segment_ids"][:, -1:].expand(-1, new_tokens)], 1)
    extended["context_mask"] = torch.cat([inputs["context_mask"], pad * 0], 1)
    with torch.no_grad():
        full = model(input_ids=generated, **extended, use_cache=False).logits
    start = inputs["input_ids"].shape[1] - 1
    assert torch.equal(full[:, start:-1].argmax(-1), generated[:, start + 1:])

    # And the cached step logits equal the uncached ones.
    with torch.no_grad():
        prefix = {k: v[:, : start + 1] if v.dim() == 2 and v.shape[1] == generated.shape[1] else v
                  for k, v in extended.items()}
        out = model(input_ids=generated[:, : start + 1], **prefix, use_cache=True)
        step = model(input_ids=generated[:, start + 1: start + 2], cache=out.cache,
                     **{k: v[:, : start + 2] if v.dim() == 2 and v.shape[1] == generated.shape[1] else v
                        for k, v in extended.items()})
    assert torch.allclose(step.logits[:, -1], full[:, start + 1], atol=1e-4, rtol=0)


def test_sdpa_equals_eager(pair):
    _, model, tokenizer, path = pair
    sdpa = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    inputs = _inputs(tokenizer, PROMPTS)
    with torch.no_grad():
        a = model(**inputs).logits
        b = sdpa(**inputs).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=0)  # padding included: it sees nothing in both
    assert torch.equal(
        model.generate(**inputs, max_new_tokens=5, do_sample=False),
        sdpa.generate(**inputs, max_new_tokens=5, do_sample=False),
    )


def test_batch_equals_one_at_a_time(pair):
    _, model, tokenizer, _ = pair
    batched = model.generate(**_inputs(tokenizer, PROMPTS), max_new_tokens=5, do_sample=False)[:, -5:]
    for i, data in enumerate(PROMPTS):
        single = model.generate(**_inputs(tokenizer, [data]), max_new_tokens=5, do_sample=False)[:, -5:]
        assert torch.equal(single[0], batched[i])


@pytest.mark.oracle
@pytest.mark.parametrize(
    "settings",
    [
        dict(beam_size=3, max_length=10, repetition_penalty=1.1, length_penalty=3.0, temperature=0.7),
        dict(beam_size=2, max_length=6, repetition_penalty=1.0, length_penalty=1.0, temperature=1.0),
        dict(beam_size=4, max_length=12, repetition_penalty=1.5, length_penalty=0.5, temperature=1.3),
    ],
)
@pytest.mark.parametrize("decode_mode", ["dynamic", "static"])
def test_beam_search_matches_original(pair, settings, decode_mode):
    from oracle import original_beam_search

    original, model, tokenizer, _ = pair
    inputs = _inputs(tokenizer, PROMPTS)
    ours = cpmbee_beam_search(model, **inputs, **settings, decode_mode=decode_mode)
    assert ours == original_beam_search(original, PROMPTS, **settings)


@pytest.mark.oracle
@pytest.mark.parametrize("decode_mode", ["dynamic", "static"])
def test_beam_search_matches_original_with_endings_and_several_answers(pair, decode_mode):
    """Make `</s>` likely so hypotheses finish early and answers move from one slot to the next."""
    from oracle import original_beam_search

    original, model, tokenizer, _ = pair
    original = copy.deepcopy(original)
    model = copy.deepcopy(model)
    with torch.no_grad():
        original.input_embedding.weight[7] *= 6.0
        model.model.embed_tokens.weight[7] *= 6.0
    datas = [
        {"question": "name two colours", "<ans>": {"first": "", "second": ""}},
        {"question": "天空是什么颜色", "<ans>": ""},
    ]
    settings = dict(beam_size=3, max_length=12, repetition_penalty=1.1, length_penalty=3.0, temperature=0.7)
    expected = original_beam_search(original, datas, **settings)
    inputs = _inputs(tokenizer, datas)
    ours = cpmbee_beam_search(model, **inputs, answer_segments=tokenizer.answer_segments(datas), **settings,
                              decode_mode=decode_mode)
    assert ours == expected
    assert any(len(slot) < settings["max_length"] for answer in expected for slot in answer)


def test_generate_writes_answers_back(pair):
    _, model, tokenizer, _ = pair
    inputs = _inputs(tokenizer, PROMPTS)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    answers = tokenizer.post_process_generation(PROMPTS, out, prompt_length=inputs["input_ids"].shape[1])
    assert len(answers) == len(PROMPTS)
    for data, answer in zip(PROMPTS, answers):
        assert set(answer) == set(data) and isinstance(answer["<ans>"], str) and answer["<ans>"]
        assert data["<ans>"] == ""  # the caller's dict is not modified


def test_sampling_and_hf_beam_search_run_batched(pair):
    _, model, tokenizer, _ = pair
    inputs = _inputs(tokenizer, PROMPTS)
    torch.manual_seed(0)
    a = model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=20)
    torch.manual_seed(0)
    b = model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=20)
    assert torch.equal(a, b)
    beams = model.generate(**inputs, max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False)
    assert beams.shape[0] == 2 * len(PROMPTS)


def test_vocabulary_rule_in_generate(pair):
    """With the tokenizer's masks, a row never produces another row's ext entries or a forbidden <unk>."""
    _, model, tokenizer, _ = pair
    model = copy.deepcopy(model)
    with torch.no_grad():  # make <unk> and every ext entry very attractive
        model.model.embed_tokens.weight[1] *= 50.0
    inputs = _inputs(tokenizer, PROMPTS)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    vocab = model.config.vocab_size
    for row in range(len(PROMPTS)):
        if not inputs["unk_allowed"][row]:
            assert 1 not in new[row].tolist()
        own = {vocab + e for e in range(inputs["ext_table_mask"].shape[1]) if inputs["ext_table_mask"][row, e]}
        assert all(t < vocab or t in own for t in new[row].tolist())


def test_save_load_round_trip_and_dtypes(pair, tmp_path):
    _, model, tokenizer, _ = pair
    model.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.bin"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    inputs = _inputs(tokenizer, PROMPTS)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)
    for dtype in (torch.bfloat16, torch.float16):
        half = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
        assert half.dtype == dtype
        with torch.no_grad():
            logits = half(**inputs).logits
        real = inputs["attention_mask"].bool()
        assert torch.isfinite(logits[real]).all()
        agreement = (logits[real].float().argmax(-1) == model(**inputs).logits[real].argmax(-1)).float().mean()
        assert agreement > 0.8


def test_gradient_checkpointing_gives_same_gradients(pair):
    _, model, tokenizer, _ = pair
    datas = [{"question": "1 + 1 = ?", "<ans>": "2"}, {"input": "天空", "<ans>": "蓝色的"}]
    inputs = _inputs(tokenizer, datas, return_labels=True)

    def gradients(checkpointing):
        trained = copy.deepcopy(model).train()
        if checkpointing:
            trained.gradient_checkpointing_enable()
        loss = trained(**inputs).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in trained.named_parameters() if p.grad is not None}

    loss_a, grads_a = gradients(False)
    loss_b, grads_b = gradients(True)
    assert torch.isfinite(loss_a) and torch.allclose(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 5
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5), name


def test_inputs_embeds_equals_input_ids(pair):
    _, model, tokenizer, _ = pair
    inputs = _inputs(tokenizer, PROMPTS)
    embeds = model.model.embed(inputs["input_ids"], inputs["ext_table_ids"], inputs["ext_table_sub"])
    rest = {k: inputs[k] for k in GENERATION_KEYS}
    with torch.no_grad():
        assert torch.allclose(model(input_ids=inputs["input_ids"], **rest).logits,
                              model(inputs_embeds=embeds, **rest).logits)


def test_clear_errors(pair):
    _, model, tokenizer, _ = pair
    inputs = _inputs(tokenizer, PROMPTS[:1])
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match="ext table"):
        model(input_ids=torch.tensor([[vocab + 3]]))
    with pytest.raises(ValueError, match="segment_ids"):
        out = model(**inputs, use_cache=True)
        model(input_ids=inputs["input_ids"][:, -1:], segment_ids=inputs["segment_ids"][:, -1:], cache=out.cache)
    with pytest.raises(ValueError, match="exactly one"):
        model(attention_mask=inputs["attention_mask"])


def test_auto_classes_registered():
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model("cpmbee", vocab_size=100, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, head_dim=8, intermediate_size=32)
    assert type(AutoModel.from_config(config)).__name__ == "CpmBeeModel"
    assert type(AutoModelForCausalLM.from_config(config)) is CpmBeeForCausalLM
    assert viscpm.CpmBeeConfig is type(config)


@pytest.mark.oracle
def test_repetition_penalty_processor_matches_original():
    """Over the answer only (its <s> included), ext tokens counted by their base id."""
    from VisCPM.generation.generation_utils import apply_repetition_penalty

    from viscpm.modeling.generation_cpmbee import CpmBeeRepetitionPenaltyLogitsProcessor

    vocab, prompt_length = 50, 4
    ext_table_ids = torch.tensor([[11, 12]])
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn((2, vocab + 2), generator=generator)
    # rows: prompt (3 tokens) + answer <s> + generated tokens; id 50 is ext entry 0 (base id 11)
    raw = torch.tensor([[3, 4, 5, 6, 9, 50, 9], [3, 4, 5, 6, 11, 2, 4]])
    base = torch.tensor([[3, 4, 5, 6, 9, 11, 9], [3, 4, 5, 6, 11, 2, 4]])
    expected = scores.clone()
    apply_repetition_penalty(expected, 2, 1, base, 1.3, prompt_length - 1, raw.shape[1] - 1)
    processor = CpmBeeRepetitionPenaltyLogitsProcessor(1.3, prompt_length, vocab, ext_table_ids)
    assert torch.equal(processor(raw, scores.clone()), expected)
    assert not torch.equal(expected, scores)


def test_loading_does_not_hold_a_second_copy(tmp_path):
    """`from_pretrained` builds the model without random weights and maps the safetensors file: the peak
    memory added by loading stays near one copy of the weights (a 10B model must fit in RAM once)."""
    import subprocess
    import sys

    config = viscpm.CpmBeeConfig(hidden_size=256, num_hidden_layers=8, num_attention_heads=4, head_dim=64,
                                 intermediate_size=1024)
    model = CpmBeeForCausalLM(config)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(tmp_path)
    del model
    script = (
        "import sys, torch, viscpm\n"
        "from transformers import AutoModelForCausalLM\n"
        "viscpm.CpmBeeForCausalLM  # the model code is imported before the measurement, as the loading is measured\n"
        "def kib(field):\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1])\n"
        "before = kib('VmRSS:')\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # restart the peak (VmHWM) from here\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map='cpu')\n"
        "logits = model(input_ids=torch.tensor([[5, 6, 7]])).logits\n"
        "print((kib('VmHWM:') - before) * 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    added = int(result.stdout.strip().splitlines()[-1])
    assert size > 100 * 2**20
    assert added < 1.5 * size, f"loading {size / 2**20:.0f} MiB of weights added {added / 2**20:.0f} MiB"


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_static_decoder_steps_equal_dynamic_cache(pair, implementation):
    """The fixed-shape decode step gives the logits of the growing-cache forward, step after step, for a
    left-padded batch with ext-table ids fed back in, including a beam reordering between steps (between the
    two rows of one prompt, as beams of one sample)."""
    from viscpm.modeling.generation_cpmbee import CpmBeeStaticDecoder
    from transformers.cache_utils import DynamicCache

    _, model, tokenizer, _ = pair
    model = copy.deepcopy(model)
    model.config._attn_implementation = implementation
    inputs = _inputs(tokenizer, [PROMPTS[0], PROMPTS[0], PROMPTS[2]])
    rows, prompt_len = inputs["input_ids"].shape
    meta = {key: inputs[key] for key in GENERATION_KEYS}
    cache = DynamicCache(config=model.config)
    decoder = CpmBeeStaticDecoder(model, rows, prompt_len + 4)
    with torch.no_grad():
        dynamic = model(input_ids=inputs["input_ids"], cache=cache, use_cache=True, **meta).logits[:, -1]
        static = model(input_ids=inputs["input_ids"], cache=decoder.cache, use_cache=True, **meta).logits[:, -1]
        torch.testing.assert_close(static, dynamic, rtol=0, atol=1e-5)
        decoder.start(prompt_len, **meta)
        segments = inputs["segment_ids"][:, -1]
        vocab = model.config.vocab_size
        for step in range(4):
            tokens = dynamic.argmax(-1)
            tokens[0] = vocab if inputs["ext_table_ids"].shape[-1] else tokens[0]  # an ext-table id as input
            if step == 2:
                index = torch.tensor([1, 1, 2])  # row 0 continues row 1's answer
                cache.reorder_cache(index)
                decoder.reorder(index)
                meta = {key: value[index] for key, value in meta.items()}
                segments = segments[index]
            meta["attention_mask"] = torch.cat([meta["attention_mask"], torch.ones(rows, 1, dtype=torch.long)], 1)
            meta["segment_ids"] = torch.cat([meta["segment_ids"], segments[:, None]], 1)
            meta["context_mask"] = torch.cat([meta["context_mask"], torch.zeros(rows, 1, dtype=torch.long)], 1)
            dynamic = model(input_ids=tokens[:, None], cache=cache, use_cache=True, **meta).logits[:, -1]
            static = decoder.step(tokens, segments)
            torch.testing.assert_close(static, dynamic, rtol=0, atol=1e-5)
        with pytest.raises(RuntimeError, match="full"):
            decoder.step(tokens, segments)


def test_compiled_decode_step_is_one_graph_with_the_same_answers(pair, monkeypatch):
    """``decode_mode="compile"`` traces the whole step as one graph (``fullgraph=True`` fails on any break). The
    test compiles with dynamo's eager backend: inductor's code generation takes over a minute on 2 CPU cores
    here, so the generated kernels are measured in benchmarks/bench_cpmbee_decode.py instead."""

    calls = []
    compile_ = torch.compile

    def recording_compile(fn, **kwargs):
        calls.append(kwargs)
        return compile_(fn, **kwargs, backend="eager")

    monkeypatch.setattr(torch, "compile", recording_compile)
    torch._dynamo.reset()
    _, model, tokenizer, _ = pair
    settings = dict(beam_size=2, max_length=6, repetition_penalty=1.1, length_penalty=3.0, temperature=0.7)
    inputs = _inputs(tokenizer, PROMPTS)
    expected = cpmbee_beam_search(model, **inputs, **settings)
    assert cpmbee_beam_search(model, **inputs, **settings, decode_mode="compile") == expected
    assert calls == [dict(dynamic=False, fullgraph=True)]


def test_decode_mode_errors(pair):
    _, model, tokenizer, _ = pair
    inputs = _inputs(tokenizer, PROMPTS[:1])
    with pytest.raises(ValueError, match="decode_mode must be one of"):
        cpmbee_beam_search(model, **inputs, decode_mode="graph")
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        cpmbee_beam_search(model, **inputs, decode_mode="cuda_graph")
