"""transformers' contracts on CPM-Bee and VisCPM-Chat with the tokenizer's structured inputs, ext table included
(issue 13, items 1-6, 8 and 9; the upstream test mixins in tests/conformance run them on inputs without ext ids):

* outputs follow the arguments and the config: attentions, hidden states, tuples;
* nothing is swallowed: unknown arguments are errors, `shift_labels` sets the targets;
* prompt lookup and assisted decoding extend the per-token inputs over their candidates and equal greedy search;
  plain `input_ids` give a causal language model (a cache changes nothing);
* `torch.export` traces the forward passes (no branch on tensor values) and the programs give the same outputs;
* training reaches every trainable parameter, gradient checkpointing included; the last vision layer's image
  outputs, which nothing reads, are neither computed nor trainable.
"""

import copy

import pytest
import torch

from viscpm import (
    CpmBeeConfig,
    CpmBeeForCausalLM,
    CpmBeeModel,
    CpmBeeTokenizer,
    VisCPMChatConfig,
    VisCPMChatForConditionalGeneration,
    VisCPMVisionConfig,
    VisCPMVisionModel,
)
from viscpm.modeling.modeling_viscpm_chat import VisCPMVisionMLP, find_image_bound

TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, head_dim=8, intermediate_size=48,
            position_bias_num_buckets=32, position_bias_num_segment_buckets=32, position_bias_max_distance=64,
            rotary_dtype="float32")
VISION = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40, image_size=16,
              patch_size=8, max_query_positions=8)
QUERY_NUM = 4
# Repeated text (prompt lookup finds candidates in it), out-of-vocabulary pieces (the ext table), several segments.
PROMPTS = [
    {"input": "abc abc abc abc 𠀀 𠀁", "question": "abc abc?", "<ans>": ""},
    {"caption": "一只猫 一只猫 <unk_2> 𠀂", "<ans>": ""},
]
FORWARD_KEYS = ("input_ids", "attention_mask", "segment_ids", "context_mask", "segment_rel", "ext_table_ids",
                "ext_table_sub")


@pytest.fixture(scope="module")
def tokenizer(vocab_file):
    return CpmBeeTokenizer(vocab_file)


@pytest.fixture(scope="module")
def bee():
    torch.manual_seed(0)
    return CpmBeeForCausalLM(CpmBeeConfig(**TEXT)).eval()


@pytest.fixture(scope="module")
def chat():
    torch.manual_seed(0)
    config = VisCPMChatConfig(vision_config=VISION, text_config=TEXT, query_num=QUERY_NUM)
    return VisCPMChatForConditionalGeneration(config).eval()


def _encode(tokenizer, datas, **kwargs):
    return dict(tokenizer(copy.deepcopy(datas), return_tensors="pt", padding=True, **kwargs))


def _forward_inputs(inputs):
    return {key: inputs[key] for key in FORWARD_KEYS if key in inputs}


def _chat_inputs(tokenizer, question="abc abc abc 𠀀 𠀁"):
    data = {"image": "<unk>" * QUERY_NUM, "context": "", "question": question, "<ans>": ""}
    inputs = _encode(tokenizer, [data])
    inputs["pixel_values"] = torch.randn((1, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    return inputs


# -- outputs (items 1-3) -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attentions_hidden_states_and_tuples(bee, tokenizer, implementation):
    model = copy.deepcopy(bee)
    model.set_attn_implementation(implementation)
    inputs = _forward_inputs(_encode(tokenizer, PROMPTS))
    batch, length = inputs["input_ids"].shape
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
        assert len(out.attentions) == TEXT["num_hidden_layers"]
        assert all(a.shape == (batch, TEXT["num_attention_heads"], length, length) for a in out.attentions)
        # probabilities: rows of real tokens sum to one, padding rows (which see nothing) to zero
        sums = out.attentions[0].sum(-1)
        real = inputs["attention_mask"].bool()
        assert torch.allclose(sums.permute(0, 2, 1)[real], torch.ones(()), atol=1e-5)
        assert torch.all(sums.permute(0, 2, 1)[~real] == 0)
        assert len(out.hidden_states) == TEXT["num_hidden_layers"] + 1
        plain = model(**inputs)
        assert plain.attentions is None and plain.hidden_states is None
        assert torch.allclose(plain.logits, out.logits, atol=1e-5)  # the eager path for attentions, same numbers
        model.config.output_hidden_states = True
        assert len(model(**inputs).hidden_states) == TEXT["num_hidden_layers"] + 1
        model.config.output_hidden_states = False
        as_tuple = model(**inputs, return_dict=False, use_cache=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], plain.logits)
        base = model.model(**inputs, return_dict=False, use_cache=False, output_hidden_states=True)
        assert isinstance(base, tuple) and len(base) == 2 and len(base[1]) == TEXT["num_hidden_layers"] + 1


def test_chat_outputs_follow_the_arguments(chat, tokenizer):
    inputs = _forward_inputs(_chat_inputs(tokenizer)) | {"pixel_values": _chat_inputs(tokenizer)["pixel_values"]}
    with torch.no_grad():
        out = chat(**inputs, output_attentions=True, output_hidden_states=True)
        assert len(out.attentions) == TEXT["num_hidden_layers"] and len(out.hidden_states) == 3
        assert len(out.image_outputs.attentions) == VISION["num_hidden_layers"]
        assert out.image_outputs.pooler_output.shape == (1, QUERY_NUM, TEXT["hidden_size"])
        assert torch.equal(out.image_outputs.pooler_output, out.vision_hidden_states)
        as_tuple = chat(**inputs, return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.allclose(as_tuple[0], out.logits, atol=1e-5)
        model = copy.deepcopy(chat)
        model.config.output_hidden_states = True  # the composite config, not only the text config
        assert len(model(**inputs).hidden_states) == TEXT["num_hidden_layers"] + 1


# -- nothing swallowed (item 6) ------------------------------------------------------------------------------------


def test_unknown_arguments_are_errors(bee, chat, tokenizer):
    inputs = _forward_inputs(_encode(tokenizer, PROMPTS))
    for model in (bee, bee.model):
        with pytest.raises(TypeError, match="shift_label"):
            model(**inputs, shift_label=inputs["input_ids"])
    with pytest.raises(TypeError, match="position_ids"):
        chat(**_forward_inputs(_chat_inputs(tokenizer)), position_ids=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="foo"):  # transformers' own check of generate()'s model arguments
        bee.generate(**inputs, max_new_tokens=2, foo=1)
    # The tokenizer's decoding masks go with its output: `model(**tokenizer(...))` works.
    with torch.no_grad():
        assert bee(**_encode(tokenizer, PROMPTS)).logits.shape[0] == 2
    # The old cache name still works, with a deprecation warning.
    with pytest.warns(FutureWarning, match="past_key_values"), torch.no_grad():
        bee(**inputs, past_key_values=None, use_cache=True)


def test_shift_labels_are_the_targets(bee, tokenizer):
    inputs = _encode(tokenizer, [{"question": "1 + 1 = ?", "<ans>": "2"}], return_labels=True)
    labels = inputs.pop("labels")
    other = torch.where(labels == -100, labels, (labels + 1) % 50)
    with torch.no_grad():
        reference = bee(**inputs, labels=labels).loss
        assert torch.equal(bee(**inputs, shift_labels=labels).loss, reference)
        assert torch.equal(bee(**inputs, labels=other, shift_labels=labels).loss, reference)
        assert not torch.equal(bee(**inputs, labels=labels, shift_labels=other).loss, reference)


# -- generation over candidates and plain text (items 4, 5) --------------------------------------------------------


def _with_answer(inputs, tokens):
    """The prompt followed by ``tokens`` as answer tokens (last segment, not context), as generate() lays them out."""
    extended, count = dict(inputs), tokens.shape[1]
    extended["input_ids"] = torch.cat([inputs["input_ids"], tokens], dim=1)
    extended["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(tokens)], dim=1)
    extended["segment_ids"] = torch.cat([inputs["segment_ids"], inputs["segment_ids"][:, -1:].expand(-1, count)], 1)
    extended["context_mask"] = torch.cat([inputs["context_mask"], torch.zeros_like(tokens)], dim=1)
    return extended


def _candidate_steps(model):
    """Records the number of new tokens of each forward pass (candidate verification reads several)."""
    calls = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[1]
                                                  if kwargs.get("input_ids") is not None else None),
        with_kwargs=True)
    return calls, hook


def _read_candidates(calls, prompt_length):
    """Whether a forward pass read candidates: the first (the prompt, and candidates when they are proposed at once)
    past the prompt, or a later one more than one token."""
    return calls[0] > prompt_length or any(count is not None and count > 1 for count in calls[1:])


@pytest.mark.parametrize("kind", ["cpmbee", "chat"])
def test_prompt_lookup_and_assisted_decoding_equal_greedy(bee, chat, tokenizer, kind):
    """The answer so far repeats itself (``g + g[:2]``), so prompt lookup proposes the tokens that followed ``g[:2]``
    as candidates; their verification reads several new tokens at once, past the prompt's per-token inputs."""
    model = bee if kind == "cpmbee" else chat
    inputs = _encode(tokenizer, PROMPTS[:1]) if kind == "cpmbee" else _chat_inputs(tokenizer)
    first = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    inputs = _with_answer(inputs, torch.cat([first, first[:, :2]], dim=1))
    greedy = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    calls, hook = _candidate_steps(model)
    try:
        looked_up = model.generate(**inputs, max_new_tokens=6, do_sample=False, prompt_lookup_num_tokens=3)
        assert _read_candidates(calls, inputs["input_ids"].shape[1]), calls
        calls.clear()
        assisted = model.generate(**inputs, max_new_tokens=6, do_sample=False, assistant_model=copy.deepcopy(model))
        assert _read_candidates(calls, inputs["input_ids"].shape[1]), calls
    finally:
        hook.remove()
    assert torch.equal(looked_up, greedy) and torch.equal(assisted, greedy)
    assert torch.equal(model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False), greedy)


def test_plain_input_ids_are_a_causal_language_model(bee):
    ids = torch.tensor([[6, 10, 31, 57, 93, 8, 44, 17]])
    with torch.no_grad():
        full = bee(input_ids=ids).logits
        changed = bee(input_ids=torch.cat([ids[:, :-1], torch.tensor([[99]])], dim=1)).logits
    assert torch.equal(full[:, :-1], changed[:, :-1]) and not torch.equal(full[:, -1], changed[:, -1])
    cached = bee.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(bee.generate(input_ids=ids, max_new_tokens=6, do_sample=False, use_cache=False), cached)
    assert torch.equal(bee.generate(input_ids=ids, max_new_tokens=6, do_sample=False, prompt_lookup_num_tokens=2),
                       cached)
    # Each generated token is the argmax of a full forward pass over everything before it.
    with torch.no_grad():
        logits = bee(input_ids=cached).logits
    assert torch.equal(logits[:, ids.shape[1] - 1:-1].argmax(-1), cached[:, ids.shape[1]:])


# -- torch.export (item 8) -----------------------------------------------------------------------------------------


def test_torch_export_of_both_models(bee, chat, tokenizer):
    inputs = _forward_inputs(_encode(tokenizer, PROMPTS))
    assert inputs["ext_table_ids"].shape[1] > 0 and int(inputs["input_ids"].max()) >= bee.config.vocab_size
    program = torch.export.export(bee, args=(), kwargs={**inputs, "use_cache": False}, strict=True)
    with torch.no_grad():
        assert torch.allclose(program.module()(**inputs, use_cache=False).logits,
                              bee(**inputs, use_cache=False).logits, atol=1e-5)
    chat_inputs = _chat_inputs(tokenizer)
    chat_inputs = {**_forward_inputs(chat_inputs), "pixel_values": chat_inputs["pixel_values"]}
    chat_inputs["image_bound"] = find_image_bound(chat_inputs["input_ids"], chat_inputs["segment_ids"],
                                                  query_num=QUERY_NUM)
    program = torch.export.export(chat, args=(), kwargs={**chat_inputs, "use_cache": False})
    exported = program.module()(**chat_inputs, use_cache=False)
    with torch.no_grad():
        reference = chat(**chat_inputs, use_cache=False)
    assert torch.allclose(exported.logits, reference.logits, atol=1e-5)
    assert torch.allclose(exported.vision_hidden_states, reference.vision_hidden_states, atol=1e-5)


# -- training (item 9) ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True])
def test_every_trainable_parameter_gets_a_gradient(chat, tokenizer, checkpointing):
    model = copy.deepcopy(chat).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    data = {"image": "<unk>" * QUERY_NUM, "context": "", "question": "这是什么？", "<ans>": "一只猫"}
    inputs = _encode(tokenizer, [data], return_labels=True)
    inputs["pixel_values"] = torch.randn((1, 3, 16, 16), generator=torch.Generator().manual_seed(1))
    model(**inputs).loss.backward()
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    missing = [name for name, param in model.named_parameters() if param.requires_grad and param.grad is None]
    assert not missing
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    last = f"vision_model.layers.{VISION['num_hidden_layers'] - 1}."
    assert frozen == {
        *(last + part + suffix for part in ("attention.q_proj.image", "attention.inner_norm.image",
                                            "attention.o_proj.image", "mlp_norm.image", "mlp.image.fc1",
                                            "mlp.image.inner_norm", "mlp.image.fc2")
          for suffix in (".weight", ".bias")),
        "vision_model.post_layernorm.image.weight", "vision_model.post_layernorm.image.bias",
    }
    assert len(trainable) + len(frozen) == len(list(model.parameters()))


def test_unused_image_outputs_change_nothing(chat):
    """The query outputs are the same whether or not the last layer computes the image part."""
    vision = chat.vision_model
    pixels = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(2))
    query = chat.query.expand(2, -1, -1)
    with torch.no_grad():
        full = vision(pixels, query_embeds=query, image_outputs=True)
        queries_only = vision(pixels, query_embeds=query, image_outputs=False)
    assert full.last_hidden_state.shape[1] == (16 // 8) ** 2 + 1 + QUERY_NUM
    assert torch.allclose(full.query_hidden_states, queries_only.query_hidden_states, atol=1e-6)
    assert torch.equal(queries_only.last_hidden_state, queries_only.query_hidden_states)


# -- config (issue 12: hidden_act is read) ---------------------------------------------------------------------------


def test_vision_hidden_act_is_honoured():
    gelu, relu = VisCPMVisionMLP(VisCPMVisionConfig(**VISION)), VisCPMVisionMLP(VisCPMVisionConfig(**VISION,
                                                                                                    hidden_act="relu"))
    relu.load_state_dict(gelu.state_dict())
    states = torch.randn((1, 3, VISION["hidden_size"]), generator=torch.Generator().manual_seed(3))
    assert isinstance(relu.act, torch.nn.ReLU) and not torch.allclose(gelu(states), relu(states))
    assert torch.allclose(gelu(states), gelu.fc2(gelu.inner_norm(torch.nn.functional.gelu(gelu.fc1(states)))))
    with pytest.raises(ValueError, match="hidden_act 'swishy'"):
        VisCPMVisionConfig(hidden_act="swishy")
    model = VisCPMVisionModel(VisCPMVisionConfig(**VISION, hidden_act="silu"))
    assert all(type(layer.mlp.image.act).__name__ == "SiLUActivation" for layer in model.layers)
    assert "initializer_range" not in CpmBeeConfig().to_diff_dict() and not hasattr(CpmBeeConfig(), "max_segment_depth")
    assert isinstance(CpmBeeModel(CpmBeeConfig(**TEXT)), CpmBeeModel)
