"""lmms-eval (the real package and its CLI) evaluates VisCPM-Chat through viscpm's entry point, on the tiny converted
Chat of the `chat` fixture and two tiny tasks written to disk (a `load_from_disk` dataset, no Hub):

* the entry point (group ``lmms_eval.models``) resolves to `VisCPMLmms`, and lmms-eval's registry finds it;
* a ``generate_until`` task (exact match): every logged answer is what `VisCPMChat.chat` answers for the same image,
  question and decoding settings, cut at the task's ``until``, and the score is the share of rows whose target equals
  that answer (three of four rows are built to match);
* a ``multiple_choice`` task: each logged option score is the negative log-likelihood (lmms-eval takes the argmin),
  which equals the sum of ``generate()``'s own greedy-step log-probabilities for the greedy answer (and that option is
  flagged greedy) and the model's own loss for the others; the accuracy is the share of rows whose gold option is the
  argmax of those log-likelihoods, computed here;
* bad input is a clear error: an unknown task name (before the model loads; no results written), a document without
  an image or with two, acc_mutual_info's image-less requests, a bad sampling setting, unknown model arguments,
  multi-round tasks.

The CLI runs twice in subprocesses (~10 s each: lmms-eval indexes its own ~2000 task files at start).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from viscpm import VisCPMChat

ROWS = 4
GEN_SETTINGS = dict(max_new_tokens=6, num_beams=1, do_sample=False)  # what the gen task's generation_kwargs become
GREEDY = dict(original_beam_search=False, num_beams=1, do_sample=False, repetition_penalty=1.0, max_new_tokens=4)


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))


def _question(i: int) -> str:
    return f"What is in picture {i}? a<b"


@pytest.fixture(scope="module")
def viscpm_chat(chat):
    return VisCPMChat.from_pretrained(chat[3], device="cpu")


def _greedy(viscpm_chat, image, question):
    """The greedy answer of transformers' loop (plain text) and the sum of its steps' log-probabilities, from
    ``generate()``'s scores (the logits after CPM-Bee's vocabulary rule)."""
    processor, model = viscpm_chat.processor, viscpm_chat.model
    inputs = processor(images=image, text=question, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, **GREEDY, output_scores=True, return_dict_in_generate=True)
    new = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    eos = processor.tokenizer.eos_token_id
    count = new.index(eos) if eos in new else len(new)
    logprob = sum(float(torch.log_softmax(out.scores[t][0].float(), -1)[new[t]]) for t in range(count))
    answer = viscpm_chat.chat(image, question, **GREEDY).answer
    return processor.tokenizer.unescape(answer), logprob


def _loss_logprob(viscpm_chat, image, question, answer):
    """log p(answer | question, image) from the model's own loss on the answered-chat layout (targets: the answer's
    tokens, not its closing </s>), without the vocabulary rule (so equal to ~1e-3 only)."""
    processor, model = viscpm_chat.processor, viscpm_chat.model
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": answer}]
    encoding = processor.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                             return_tensors="pt")
    positions = encoding.pop("assistant_masks")[0].nonzero().flatten()[:-1]
    targets = torch.full_like(encoding["input_ids"], -100)
    targets[0, positions - 1] = encoding["input_ids"][0, positions]  # CPM-Bee's labels: the target *at* p is token p+1
    with torch.no_grad():
        loss = model(**encoding, labels=targets, use_cache=False).loss
    return -float(loss) * len(positions)


def _lmms_eval(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(cwd / "hf-home"),
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "lmms_eval", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, chat, viscpm_chat):
    """Build the dataset and the two tasks, run the CLI once on both; returns what the test needs to compare."""
    import datasets

    root = tmp_path_factory.mktemp("lmms-eval")
    images = [_image(i) for i in range(ROWS)]
    questions = [_question(i) for i in range(ROWS)]
    tokenizer = viscpm_chat.processor.tokenizer

    answers = [tokenizer.unescape(viscpm_chat.chat(image, q, **GEN_SETTINGS).answer)
               for image, q in zip(images, questions)]
    until = answers[0][1:3] if len(answers[0]) >= 3 else "\n\n"  # a stop string that cuts the first answer
    expected = [answer.split(until, 1)[0].strip() for answer in answers]
    assert until == "\n\n" or len(expected[0]) < len(answers[0].strip())  # the stop string does cut
    targets = [expected[0], "not the answer", expected[2], expected[3]]

    greedy = [_greedy(viscpm_chat, image, q) for image, q in zip(images, questions)]
    choices = [[greedy[i][0], "yes", f"no{i}"] for i in range(ROWS)]
    labels = [0, 1, 2, 0]

    features = datasets.Features({
        "image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")), "label": datasets.Value("int64"),
    })
    rows = {"image": images, "question": questions, "answer": targets, "choices": choices, "label": labels}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(root / "data")
    tasks = root / "tasks"
    tasks.mkdir()
    common = (f"dataset_path: {json.dumps(str(root / 'data'))}\ndataset_kwargs:\n  load_from_disk: true\n"
              "test_split: test\ndoc_to_visual: image\ndoc_to_text: \"{{question}}\"\n")
    (tasks / "viscpm_tiny_gen.yaml").write_text(
        "task: viscpm_tiny_gen\n" + common + "output_type: generate_until\ndoc_to_target: answer\n"
        "generation_kwargs:\n  max_new_tokens: 6\n  num_beams: 1\n  temperature: 0\n  do_sample: false\n"
        f"  until: [{json.dumps(until)}]\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    (tasks / "viscpm_tiny_mc.yaml").write_text(
        "task: viscpm_tiny_mc\n" + common + "output_type: multiple_choice\ndoc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")

    out = root / "out"
    run = _lmms_eval(root, "--model", "viscpm", "--model_args", f"pretrained={chat[3]},device=cpu",
                     "--tasks", "viscpm_tiny_gen,viscpm_tiny_mc", "--include_path", str(tasks), "--batch_size", "2",
                     "--output_path", str(out), "--log_samples", "--limit", str(ROWS))
    found = {path.name: path for path in out.rglob("*") if path.is_file()}
    results = [path for name, path in found.items() if name.endswith("_results.json")]
    assert run.returncode == 0 and len(results) == 1, run.stdout[-4000:] + run.stderr[-4000:]

    def samples(task):
        (path,) = [path for name, path in found.items() if name.endswith(f"_samples_{task}.jsonl")]
        return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])

    return dict(results=json.loads(results[0].read_text())["results"], gen=samples("viscpm_tiny_gen"),
                mc=samples("viscpm_tiny_mc"), expected=expected, targets=targets, greedy=greedy, choices=choices,
                labels=labels, images=images, questions=questions, root=root)


def test_entry_point_resolves():
    from lmms_eval.models import get_model

    from viscpm.evaluation.lmms_eval import VisCPMLmms

    (point,) = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "viscpm"]
    manifest = point.load()()
    assert manifest.model_id == "viscpm" and manifest.simple_class_path == "viscpm.evaluation.lmms_eval.VisCPMLmms"
    assert get_model("viscpm") is VisCPMLmms


def test_generate_until_is_chat_and_exact_match(evaluated):
    gen = evaluated["gen"]
    assert [sample["doc_id"] for sample in gen] == list(range(ROWS))
    logged = [sample["filtered_resps"] for sample in gen]
    logged = [resp[0] if isinstance(resp, list) else resp for resp in logged]  # lmms-eval 0.6 logs [answer]
    assert [resp.strip() for resp in logged] == evaluated["expected"]
    share = np.mean([target == answer for target, answer in zip(evaluated["targets"], evaluated["expected"])])
    assert share == 0.75
    assert evaluated["results"]["viscpm_tiny_gen"]["exact_match,none"] == pytest.approx(share)


def test_multiple_choice_is_the_most_likely_option(evaluated, viscpm_chat):
    correct = []
    for i, sample in enumerate(evaluated["mc"]):
        scores = [(float(value), str(greedy) == "True") for value, greedy in sample["filtered_resps"]]
        image, question = evaluated["images"][i], evaluated["questions"][i]
        answer, greedy_logprob = evaluated["greedy"][i]
        # the greedy answer: its negative log-likelihood is generate()'s own, and it is flagged greedy
        assert scores[0][0] == pytest.approx(-greedy_logprob, abs=1e-4)
        assert scores[0][1] is True
        logprobs = [greedy_logprob] + [_loss_logprob(viscpm_chat, image, question, c)
                                       for c in evaluated["choices"][i][1:]]
        for (value, greedy), logprob in zip(scores[1:], logprobs[1:]):
            assert value == pytest.approx(-logprob, abs=1e-3)
            assert greedy is False
        assert sample["acc"] == float(int(np.argmax(logprobs)) == evaluated["labels"][i])
        correct.append(int(np.argmax(logprobs)) == evaluated["labels"][i])
    assert evaluated["results"]["viscpm_tiny_mc"]["acc,none"] == pytest.approx(np.mean(correct))


def test_unknown_task_is_a_clear_error(evaluated, chat):
    root = evaluated["root"]
    run = _lmms_eval(root, "--model", "viscpm", "--model_args", f"pretrained={chat[3]},device=cpu",
                     "--tasks", "viscpm_no_such_task", "--include_path", str(root / "tasks"),
                     "--output_path", str(root / "out-unknown"))
    # lmms-eval prints the error and exits 0 (it re-raises only with --verbosity DEBUG); nothing is written
    assert "Tasks not found: viscpm_no_such_task" in run.stdout + run.stderr
    assert not (root / "out-unknown").exists() or not any((root / "out-unknown").rglob("*_results.json"))


# -- bad input, in-process ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm(chat):
    from viscpm.evaluation.lmms_eval import VisCPMLmms

    model = VisCPMLmms(pretrained=str(chat[3]), device="cpu", batch_size=2)
    model.task_dict = {"t": {"test": [{"image": _image(0)}, {"image": None}, {"image": [_image(1), _image(2)]},
                                      {"image": []}]}}
    return model


def _request(kind, *args):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=kind, arguments=args, idx=0, metadata={"task": "t", "doc_id": 0, "repeats": 1})


def _visual(doc):
    image = doc["image"]
    return image if isinstance(image, list) else [image]


@pytest.mark.parametrize("doc_id, message", [(1, "doc 1 has no image"), (3, "doc 3 has no image"),
                                             (2, "doc 2 has 2 visuals: VisCPM-Chat sees one image")])
def test_missing_or_several_images_are_errors(lm, doc_id, message):
    with pytest.raises(ValueError, match=message):
        lm.generate_until([_request("generate_until", "q", {"max_new_tokens": 2}, _visual, doc_id, "t", "test")])
    with pytest.raises(ValueError, match=message):
        lm.loglikelihood([_request("loglikelihood", "q", " yes", _visual, doc_id, "t", "test")])


def test_bad_requests_are_errors(lm):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        lm.generate_until([_request("generate_until", "q", {"do_sample": True, "temperature": 0}, _visual, 0, "t",
                                    "test")])
    with pytest.raises(ValueError, match="until"):
        lm.generate_until([_request("generate_until", "q", {"until": 3}, _visual, 0, "t", "test")])
    with pytest.raises(ValueError, match="acc_mutual_info"):
        lm.loglikelihood([_request("loglikelihood", "", "yes")])
    with pytest.raises(ValueError, match="empty continuation"):
        lm.loglikelihood([_request("loglikelihood", "q", " ", _visual, 0, "t", "test")])
    with pytest.raises(NotImplementedError, match="generate_until_multi_round"):
        lm.generate_until_multi_round([])


def test_loglikelihood_output_type_gets_the_log_likelihood(lm):
    """An ``output_type: loglikelihood`` request (its continuation is the task's doc_to_target) gets log p itself
    (lmms-eval's perplexity is exp(-mean)); a multiple-choice one (a string, the delimiter in front) its negative."""
    (mc,) = lm.loglikelihood([_request("loglikelihood", "q", " yes", _visual, 0, "t", "test")])
    (ll,) = lm.loglikelihood([_request("loglikelihood", "q", lambda doc: "yes", _visual, 0, "t", "test")])
    mc, ll = getattr(mc, "text", mc), getattr(ll, "text", ll)  # lmms-eval >= 0.7 gets GenerationResult wrappers
    assert ll[0] < 0 and mc[0] == pytest.approx(-ll[0]) and mc[1] == ll[1]


def test_unknown_model_arguments_are_errors(chat):
    from viscpm.evaluation.lmms_eval import VisCPMLmms

    with pytest.raises(TypeError, match=r"unknown arguments \['beam_size'\]"):
        VisCPMLmms(pretrained=str(chat[3]), device="cpu", beam_size=3)
    with pytest.raises(ValueError, match="batch_size must be a whole number"):
        VisCPMLmms(pretrained=str(chat[3]), device="cpu", batch_size="auto")
