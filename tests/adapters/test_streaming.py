"""Streamed training data (`datasets` IterableDataset, `load_rows(..., streaming=True)`): a local folder of JSONL /
parquet files and images gives, row for row, the examples of the map-style preparation (bad rows skipped or raised
alike), `Trainer` trains on the stream, and a stream without ``max_steps`` is a clear error.

Tiny models: the converted tiny Chat of the `chat` fixture and the tokenizer of the tiny Paint (`paint`).
"""

import json
import logging

import datasets
import pytest
from adapter_helpers import load_example, png_bytes
from transformers import AutoModelForImageTextToText, AutoProcessor

from viscpm import adapters as A
from viscpm.adapters import AdapterError, BadDataError
from viscpm.adapters.data import is_streaming

COMMON = dict(use_cpu=True, per_device_train_batch_size=2, disable_tqdm=True, seed=0, save_steps=1, logging_steps=1,
              lr_scheduler_type="constant", report_to="none")
TURNS = [{"from": "human", "value": "<image>\nWas siehst du?"}, {"from": "gpt", "value": "Einen Hund."},
         {"from": "human", "value": "Welche Farbe?"}, {"from": "gpt", "value": "Braun."}]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A local corpus: ``rows/`` (a JSONL file of caption and conversation rows, a bad image and an empty caption
    among them) with its images in ``images/``, and ``paint/`` (a parquet file, the images stored in it)."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "images").mkdir()
    (root / "rows").mkdir()
    for i in range(4):
        (root / "images" / f"{i}.png").write_bytes(png_bytes(i))
    (root / "images" / "broken.png").write_bytes(b"not a png")
    rows = [{"image": "0.png", "caption": "A red bicycle.", "conversations": TURNS},
            {"image": "broken.png", "caption": "A broken image.", "conversations": TURNS},
            {"image": "1.png", "caption": " ", "conversations": TURNS[:2]},
            {"image": "2.png", "caption": "Two cats on a sofa.", "conversations": TURNS[:2]},
            {"image": "3.png", "caption": "A lamp.", "conversations": TURNS}]
    (root / "rows" / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (root / "paint").mkdir()
    paint_rows = [{"image": {"bytes": png_bytes(i, (20, 24)), "path": None}, "caption": caption}
                  for i, caption in enumerate(["A red bicycle.", "", "Two cats on a sofa."])]
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_list(paint_rows, features=features).to_parquet(str(root / "paint" / "train.parquet"))
    return root


@pytest.fixture(scope="module")
def processor(chat):
    return AutoProcessor.from_pretrained(chat[3])


def _both(source, prepare, **kwargs):
    """(map-style examples, streamed examples) of ``prepare`` on the rows of ``source``."""
    static = prepare(A.load_rows(source), **kwargs)
    stream = prepare(A.load_rows(source, streaming=True), **kwargs)
    assert isinstance(static, datasets.Dataset) and is_streaming(stream)
    return static, stream


def test_streamed_examples_equal_the_map_style_ones(corpus, processor, paint, caplog):
    """Every prepare_* function: the same examples, token for token, in the same order, from a stream of the folder;
    the bad rows (a corrupt image, an empty caption) are skipped and counted in the log in both."""
    rows, images = corpus / "rows", corpus / "images"
    cases = {
        "caption": (A.prepare_caption_chat_dataset, processor, dict(image_folder=images)),
        "chat": (A.prepare_chat_dataset, processor, dict(image_folder=images)),
        "text": (A.prepare_text_dataset, processor.tokenizer, {}),
    }
    counts = {}
    for what, (prepare, proc, kwargs) in cases.items():
        source = rows if what != "text" else [{"text": "Der Himmel ist blau."}, {"text": ""}, {"text": "Guten Tag."}]
        with caplog.at_level(logging.WARNING, logger="viscpm.adapters"):
            caplog.clear()
            static, stream = _both(source, lambda r, **kw: prepare(r, proc, **kw), **kwargs)
            streamed = list(stream)
        assert streamed == static.to_list(), what
        assert set(stream.column_names) == set(static.column_names)
        skipped = [r.getMessage() for r in caplog.records if "streamed" in r.getMessage()]
        assert skipped, what  # the stream's own count of its bad rows
        counts[what] = len(streamed)
    # captions: 3 good rows; chat: one example per answer (2 + 1 + 1 + 2, the empty caption is no matter there)
    assert counts == {"caption": 3, "chat": 6, "text": 2}
    tokenizer = paint["pipe"].tokenizer  # paint rows in a parquet file, the images stored in it (datasets.Image)
    static, stream = _both(corpus / "paint", A.prepare_paint_dataset, tokenizer=tokenizer)
    assert list(stream) == static.to_list() and len(static) == 2
    assert all(example["image_bytes"] for example in static)
    # the stage helper streams too (prepare_stage_dataset reads the stream's columns from its first row)
    stage = A.prepare_stage_dataset("chat-align", A.load_rows(rows, streaming=True), processor, image_folder=images)
    assert list(stage) == A.prepare_stage_dataset("chat-align", rows, processor, image_folder=images).to_list()


def test_streamed_bad_data_is_a_clear_error(corpus, processor, tmp_path):
    rows, images = corpus / "rows", corpus / "images"
    stream = A.prepare_caption_chat_dataset(A.load_rows(rows, streaming=True), processor, image_folder=images,
                                            on_bad_rows="raise")
    with pytest.raises(BadDataError, match="caption row 1: corrupt image"):
        list(stream)
    with pytest.raises(BadDataError, match=r"no usable caption examples \(skipped: \{'empty caption': 1\}\)"):
        A.prepare_caption_chat_dataset(A.load_rows([{"image": png_bytes(0), "caption": ""}], streaming=True),
                                       processor)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.jsonl").write_text('{"caption": "x"}\n', encoding="utf-8")
    with pytest.raises(BadDataError, match="no 'image' column"):
        A.load_rows(tmp_path / "empty", {"image_column": "image"}, streaming=True)
    (tmp_path / "bad.jsonl").write_text("not json\n", encoding="utf-8")
    with pytest.raises(BadDataError, match="cannot read .*bad.jsonl"):
        A.load_rows(tmp_path / "bad.jsonl", streaming=True)
    with pytest.raises(ValueError, match="drop num_proc"):
        A.prepare_text_dataset(A.load_rows([{"text": "a"}], streaming=True), processor.tokenizer, num_proc=2)


def test_trainer_trains_on_a_stream(chat, corpus, processor, tmp_path):
    """chat-align on the streamed folder: a few Trainer steps (more than one pass over the 3 good rows) and the
    stage's folder; without max_steps, a clear error before anything is written."""
    folder, rows, images = chat[3], corpus / "rows", corpus / "images"
    model = AutoModelForImageTextToText.from_pretrained(folder)
    stream = A.prepare_stage_dataset("chat-align", A.load_rows(rows, streaming=True), processor, image_folder=images)
    with pytest.raises(AdapterError, match="give the number of optimizer steps with --max-steps"):
        A.train_stage(model, stream, "chat-align", tmp_path / "never", processor=processor, **COMMON)
    assert not (tmp_path / "never").exists()
    before = model.query.detach().clone()
    model, result = A.train_stage(model, stream, "chat-align", tmp_path / "out", processor=processor, max_steps=3,
                                  learning_rate=1e-2, **COMMON)
    assert result.global_step == 3 and not model.query.detach().equal(before)
    logged = json.loads((tmp_path / "out" / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert [entry["step"] for entry in logged["log_history"] if "loss" in entry] == [1, 2, 3]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_script_streams_with_max_steps_only(chat, corpus, tmp_path, capsys):
    script = load_example("train_mpm_stage")
    common = ["--stage", "chat-align", "--model", str(chat[3]), "--data", str(corpus / "rows"), "--image-folder",
              str(corpus / "images"), "--streaming", "--use-cpu", "--per-device-train-batch-size", "1",
              "--disable-tqdm", "true", "--report-to", "none"]
    assert script.main([*common, "--output-dir", str(tmp_path / "x")]) == 1
    assert "--max-steps N" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert script.main([*common, "--num-proc", "2", "--max-steps", "1", "--output-dir", str(tmp_path / "y")]) == 2
    assert "--dataloader-num-workers" in capsys.readouterr().err
    assert script.main([*common, "--max-steps", "1", "--output-dir", str(tmp_path / "out")]) == 0
    assert "streaming the training examples" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / A.STAGE_RECORD).read_text())["stage"] == "chat-align"


def test_language_adapter_script_streams(chat, corpus, tmp_path, capsys):
    """--streaming reaches the language-adapter scripts too (DataArguments is shared), with the same max_steps rule."""
    script = load_example("train_language_adapter_chat")
    common = ["--model", str(chat[3]), "--language", "de", "--data", str(corpus / "rows"), "--image-folder",
              str(corpus / "images"), "--streaming", "--use-cpu", "--per-device-train-batch-size", "1",
              "--lora-r", "2", "--disable-tqdm", "true", "--report-to", "none"]
    assert script.main([*common, "--output-dir", str(tmp_path / "x")]) == 1
    assert "--max-steps N" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert script.main([*common, "--max-steps", "2", "--output-dir", str(tmp_path / "out")]) == 0
    assert "streaming the training examples" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 2
