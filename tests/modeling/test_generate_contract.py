"""Chat's `generate()` contract (issue 13, item 7) on a converted tiny VisCPM-Chat, against the original where the
answer is the original's:

* the saved generation config selects the original beam search: plain `generate(**inputs)`, `VisCPMChat.chat()` and
  the pipeline agree, and the original's own length limit is `original_max_length`;
* `max_new_tokens` caps the new tokens everywhere (`chat()` included): with it, the answer is the original's with
  `max_length = max_new_tokens - 2` (its beams close two steps after that limit);
* explicit arguments are honoured (beam count, temperature, eos_token_id=None, num_return_sequences, scores) or
  refused by name; transformers' loop runs when asked for, with its own output classes.
"""

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessorList
from transformers.generation import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

from viscpm import VisCPMChat


@pytest.fixture(scope="module")
def setup(chat):
    vlu, model, _, folder = chat
    session = VisCPMChat.from_pretrained(folder, device="cpu")
    image = Image.fromarray(np.random.default_rng(11).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    question = "这张图片里有什么？"
    inputs = session.processor(text=[question], images=[image], return_tensors="pt")
    return vlu, session, image, question, dict(inputs)


def _original(vlu, session, image, question, **settings):
    from oracle import original_chat_generate
    from VisCPM.utils.utils import build_transform

    size = session.model.config.vision_config.image_size
    defaults = dict(beam_size=3, temperature=0.7, repetition_penalty=1.1, length_penalty=3.0)
    pixels = build_transform(is_train=False, input_size=size)(image)
    return original_chat_generate(vlu, pixels, question, **{**defaults, **settings})[0]


def _new_tokens(sequences, inputs):
    return sequences[:, inputs["input_ids"].shape[1]:]


def _answer(session, question, sequences, inputs):
    prompt = session.processor.build_prompt(question, "")
    return session.processor.tokenizer.decode_answers(prompt, _new_tokens(sequences, inputs)[0].tolist())["<ans>"]


@pytest.mark.oracle
def test_saved_config_selects_the_original_and_every_entry_point_agrees(setup):
    """The converter saves the original `chat()`'s settings; `chat()` and a plain `generate(**inputs)` read them.
    (The check runs on a copy whose saved limit is 12 instead of 512, to keep the test short.)"""
    vlu, session, image, question, inputs = setup
    config = session.model.generation_config
    assert (config.original_beam_search, config.num_beams, config.beam_temperature, config.repetition_penalty,
            config.length_penalty, config.original_max_length, config.max_new_tokens) == (
        True, 3, 0.7, 1.1, 3.0, 512, 514)
    short = VisCPMChat(copy.deepcopy(session.model), session.processor)
    short.model.generation_config.original_max_length = 12
    answer = short.chat(image, question).answer
    assert answer == _original(vlu, session, image, question, max_length=12)
    plain = short.model.generate(**inputs)  # the saved generation config, nothing else
    assert _answer(session, question, plain, inputs) == answer


# max_new_tokens=1 checks ours alone; from 2 on the answer is compared with the original's as well.
@pytest.mark.parametrize("max_new_tokens", [1, *(pytest.param(n, marks=pytest.mark.oracle) for n in (2, 3, 6, 9))])
def test_max_new_tokens_caps_every_answer(setup, max_new_tokens):
    vlu, session, image, question, inputs = setup
    sequences = session.model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=None)
    assert _new_tokens(sequences, inputs).shape[1] == max_new_tokens  # no early stop: exactly the cap
    capped = session.model.generate(**inputs, max_new_tokens=max_new_tokens)
    assert _new_tokens(capped, inputs).shape[1] <= max_new_tokens
    answer = session.chat(image, question, max_new_tokens=max_new_tokens).answer
    assert _answer(session, question, capped, inputs) == answer
    if max_new_tokens >= 2:  # the original's beams close two steps after its max_length
        assert answer == _original(vlu, session, image, question, max_length=max_new_tokens - 2)


@pytest.mark.oracle
def test_original_max_length_is_the_originals_limit(setup):
    vlu, session, image, question, inputs = setup
    answer = session.chat(image, question, original_max_length=5).answer
    assert answer == _original(vlu, session, image, question, max_length=5)
    # Both limits: the smaller one decides.
    assert session.chat(image, question, original_max_length=5, max_new_tokens=4).answer == _original(
        vlu, session, image, question, max_length=2)


@pytest.mark.oracle
@pytest.mark.parametrize("settings, original", [
    (dict(num_beams=1), dict(beam_size=1)),
    (dict(num_beams=2, temperature=1.3), dict(beam_size=2, temperature=1.3)),
    (dict(repetition_penalty=1.0, length_penalty=1.0), dict(repetition_penalty=1.0, length_penalty=1.0)),
])
def test_explicit_arguments_are_the_originals(setup, settings, original):
    vlu, session, image, question, _ = setup
    answer = session.chat(image, question, original_max_length=6, **settings).answer
    assert answer == _original(vlu, session, image, question, max_length=6, **original)


def test_standard_outputs_with_scores(setup):
    _, session, _, _, inputs = setup
    out = session.model.generate(**inputs, num_beams=1, do_sample=False, max_new_tokens=3, output_scores=True,
                                 output_logits=True, return_dict_in_generate=True)
    assert isinstance(out, GenerateBeamDecoderOnlyOutput)
    new = _new_tokens(out.sequences, inputs)
    assert new.shape[1] <= 3 and len(out.scores) == len(out.logits) == new.shape[1]
    assert out.sequences_scores.shape == (1,) and out.beam_indices.shape == new.shape
    assert out.cache is not None and out.cache.get_seq_length() > inputs["input_ids"].shape[1]
    vocab = session.model.config.text_config.vocab_size + inputs["ext_table_ids"].shape[1]
    assert all(step.shape == (1, vocab) for step in out.scores + out.logits)


def test_sequences_scores_are_the_hypotheses_scores(setup):
    """Each returned answer's score is the sum of its tokens' log-probabilities (read from `scores` along
    `beam_indices`) over its length to the power of the length penalty: the original's hypothesis score."""
    _, session, _, _, inputs = setup
    out = session.model.generate(**inputs, num_beams=3, max_new_tokens=5, num_return_sequences=2,
                                 output_scores=True, return_dict_in_generate=True)
    assert out.sequences.shape[0] == 2 and out.sequences_scores.shape == (2,)
    assert out.sequences_scores[0] >= out.sequences_scores[1]
    new = _new_tokens(out.sequences, inputs)
    for row in range(2):
        steps = int((out.beam_indices[row] >= 0).sum())
        total = sum(out.scores[t][out.beam_indices[row, t], new[row, t]] for t in range(steps))
        assert torch.allclose(out.sequences_scores[row], total / steps ** 3.0, atol=1e-5)
    best = session.model.generate(**inputs, num_beams=3, max_new_tokens=5)
    assert torch.equal(best[0], out.sequences[0, : best.shape[1]])


def test_eos_token_id_none_and_lists(setup):
    _, session, _, _, inputs = setup
    eos = session.model.config.text_config.eos_token_id
    as_list = session.model.generate(**inputs, max_new_tokens=6, eos_token_id=[eos])
    assert torch.equal(as_list, session.model.generate(**inputs, max_new_tokens=6, eos_token_id=eos))
    never = session.model.generate(**inputs, max_new_tokens=6, eos_token_id=None)
    assert _new_tokens(never, inputs).shape[1] == 6


@pytest.mark.parametrize("arguments, named", [
    (dict(top_k=5), "top_k"),
    (dict(bad_words_ids=[[5]]), "bad_words_ids"),
    (dict(output_attentions=True), "output_attentions"),
    (dict(use_cache=False), "use_cache=False"),
    (dict(min_new_tokens=2), "min_new_tokens"),
    (dict(token_type_ids=torch.zeros(1, 3, dtype=torch.long)), "token_type_ids"),
    (dict(logits_processor=LogitsProcessorList()), "logits_processor"),
    (dict(num_return_sequences=4), "num_return_sequences"),
])
def test_what_the_original_cannot_do_is_refused_by_name(setup, arguments, named):
    _, session, _, _, inputs = setup
    arguments = dict(arguments)
    processors = arguments.pop("logits_processor", None)
    if processors is not None:
        processors.append(lambda ids, scores: scores)  # a list with an entry is a hook the original cannot run
    with pytest.raises(ValueError, match=named) as caught:
        session.model.generate(**inputs, max_new_tokens=2, logits_processor=processors, **arguments)
    assert "original_beam_search=False" in str(caught.value) or "num_beams" in str(caught.value)


def test_transformers_loop_when_asked(setup):
    _, session, _, _, inputs = setup
    model = session.model
    greedy = model.generate(**inputs, original_beam_search=False, num_beams=1, do_sample=False, max_new_tokens=3,
                            output_scores=True, return_dict_in_generate=True)
    assert isinstance(greedy, GenerateDecoderOnlyOutput) and len(greedy.scores) == 3
    # Greedy picks the argmax of the prompt's last logits (vocabulary rule applied).
    with torch.no_grad():
        logits = model(**{k: v for k, v in inputs.items() if k not in ("ext_table_mask", "unk_allowed")}).logits
    logits[0, -1, model.config.text_config.unk_token_id] = -1e4 if not inputs["unk_allowed"][0] else logits[0, -1, 1]
    assert int(greedy.sequences[0, inputs["input_ids"].shape[1]]) == int(logits[0, -1].argmax())
    torch.manual_seed(0)
    sampled = model.generate(**inputs, do_sample=True, num_beams=1, max_new_tokens=3, top_k=5,
                             return_dict_in_generate=True)
    assert isinstance(sampled, GenerateDecoderOnlyOutput) and sampled.sequences.shape[1] == greedy.sequences.shape[1]
    beams = model.generate(**inputs, original_beam_search=False, num_beams=2, max_new_tokens=3,
                           return_dict_in_generate=True, output_scores=True)
    assert isinstance(beams, GenerateBeamDecoderOnlyOutput) and beams.sequences_scores.shape == (1,)


def test_transformers_loop_takes_settings_without_a_deprecation_warning(setup):
    """Settings passed to generate() reach transformers' loop inside the generation config, not beside it (which
    transformers 5 warns about on every call of chat() with settings)."""
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as hf_logging

    _, session, _, _, inputs = setup
    hf_logging.warning_once.cache_clear()  # a warning already given once would not show again
    with CaptureLogger(hf_logging.get_logger("transformers.generation.utils")) as captured:
        out = session.model.generate(**inputs, original_beam_search=False, num_beams=1, do_sample=False,
                                     max_new_tokens=2, return_dict_in_generate=True, output_scores=True)
    assert len(out.scores) == 2  # the settings were honoured
    assert "Passing `generation_config` together" not in captured.out


def test_a_fresh_model_has_transformers_defaults(setup):
    _, session, _, _, inputs = setup
    fresh = type(session.model)(session.model.config).eval()
    assert getattr(fresh.generation_config, "original_beam_search", None) is None
    original = type(session.model).original_generation_config(session.model.config)
    fresh.load_state_dict(session.model.state_dict())
    assert torch.equal(fresh.generate(**inputs, generation_config=copy.deepcopy(original), max_new_tokens=8),
                       session.model.generate(**inputs, max_new_tokens=8))
