"""The Paint text-feature cache (`viscpm.adapters.paint.cache_text_features` / `load_text_features`): CPM-Bee's
states computed once and stored with the examples; paint-align trained on the cache gives the loss and the weights
of training without it (fp32, same seed) and never runs the text encoder; a cache of another model, tokenizer or
other examples is refused.

Tiny models: the tiny Paint of the `paint` fixture, loaded fresh from its folder wherever a test trains or changes it.
"""

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from adapter_helpers import png_bytes

from viscpm import VisCPMPaintPipeline
from viscpm import adapters as A
from viscpm.adapters import AdapterError
from viscpm.adapters.paint import TEXT_CACHE_RECORD, cache_text_features, load_text_features

# Captions of different lengths, so that batches hold padding (the UNet attends to padded positions too).
CAPTIONS = ["A red bicycle leaning on a brick wall.", "Two cats.", "A lamp on a small wooden table.", "Rain."]
COMMON = dict(use_cpu=True, per_device_train_batch_size=2, disable_tqdm=True, seed=0, save_steps=10, logging_steps=1,
              lr_scheduler_type="constant", report_to="none", learning_rate=1e-2)
SIZE = 16


def _fresh(paint):
    return VisCPMPaintPipeline.from_pretrained(paint["root"] / "hf")


def _examples(tokenizer, captions=CAPTIONS):
    rows = [{"image": png_bytes(i, (20, 24)), "caption": caption} for i, caption in enumerate(captions)]
    return A.prepare_stage_dataset("paint-align", rows, tokenizer)


@contextmanager
def _calls(module):
    """The number of forward calls of ``module`` in the block."""
    calls = []
    handle = module.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def built(paint, tmp_path_factory):
    pipe = _fresh(paint)
    examples = _examples(pipe.tokenizer)
    folder = tmp_path_factory.mktemp("text-cache") / "cache"
    cache = cache_text_features(examples, pipe.text_encoder, pipe.tokenizer, folder, batch_size=3)
    return dict(pipe=pipe, examples=examples, folder=folder, cache=cache)


def test_cached_states_are_cpmbee_output(built):
    """The cached batch's states are CPM-Bee's own for the same batch (padded positions included)."""
    pipe, examples, cache = built["pipe"], built["examples"], built["cache"]
    assert len(cache.dataset) == len(examples) and cache.dataset["input_ids"] == examples["input_ids"]
    plain = A.stage_collator("paint-align", pipe.tokenizer, resolution=SIZE)([examples[0], examples[1]])
    cached = cache.collator(pipe.tokenizer, resolution=SIZE)([cache.dataset[0], cache.dataset[1]])
    assert bool((plain["attention_mask"] == 0).any())  # the batch has padding
    with torch.no_grad():
        states = pipe.text_encoder(**{k: v for k, v in plain.items() if k != "pixel_values"}).text_hidden_state
    assert cached["text_states"].shape == states.shape
    torch.testing.assert_close(cached["text_states"], states, rtol=1e-5, atol=1e-6)
    assert torch.equal(cached["pixel_values"], plain["pixel_values"])


def test_training_on_the_cache_matches_and_skips_the_text_encoder(built, paint, tmp_path):
    """The same loss for the same batch and seed, and after two Trainer steps the same weights; the text encoder is
    never called when the cache is used (and is called without it, so the hook sees calls)."""
    examples, folder = built["examples"], built["folder"]
    results = {}
    for name in ("plain", "cached"):
        pipe = _fresh(paint)
        if name == "cached":
            cache = load_text_features(folder, pipe.text_encoder, pipe.tokenizer, examples=examples)
            data, collator = cache.dataset, cache.collator(pipe.tokenizer, resolution=SIZE)
        else:
            data, collator = examples, A.stage_collator("paint-align", pipe.tokenizer, resolution=SIZE)
        model, _ = A.prepare_stage(pipe, "paint-align")
        batch = collator([data[0], data[1]])
        torch.manual_seed(0)
        with _calls(pipe.text_encoder) as calls:
            loss = model(**batch)["loss"].item()
            # plain SGD: the update is linear in the gradient (Adam's normalisation would blow float noise in
            # near-zero gradients up to the size of a step)
            model, _ = A.train_stage(pipe, data, "paint-align", tmp_path / name, data_collator=collator,
                                     max_steps=2, **{**COMMON, "optim": "sgd", "learning_rate": 1.0})
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        results[name] = dict(loss=loss, calls=len(calls), trained=trained)
    plain, cached = results["plain"], results["cached"]
    assert plain["calls"] > 0 and cached["calls"] == 0
    assert cached["loss"] == pytest.approx(plain["loss"], rel=1e-6, abs=1e-7)
    assert plain["trained"].keys() == cached["trained"].keys() and plain["trained"]
    base = dict(A.prepare_stage(_fresh(paint), "paint-align")[0].named_parameters())
    for name, value in plain["trained"].items():
        torch.testing.assert_close(cached["trained"][name], value, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(value, base[name]) for name, value in plain["trained"].items())  # it trained


def test_a_cache_of_another_model_tokenizer_or_examples_is_refused(built, paint, tmp_path):
    pipe, examples, folder = built["pipe"], built["examples"], built["folder"]
    other = _fresh(paint)
    with torch.no_grad():
        other.text_encoder.model.layers[0].self_attn.q_proj.weight.mul_(1.01)
    with pytest.raises(AdapterError, match="built for another text encoder"):
        load_text_features(folder, other.text_encoder, other.tokenizer)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text(Path(pipe.tokenizer.vocab_file).read_text(encoding="utf-8") + "zzzextra\n", encoding="utf-8")
    with pytest.raises(AdapterError, match="built with another tokenizer"):
        load_text_features(folder, pipe.text_encoder, type(pipe.tokenizer)(vocab_file=str(vocab)))
    with pytest.raises(AdapterError, match="is stale: it was built from other training examples"):
        load_text_features(folder, pipe.text_encoder, pipe.tokenizer,
                           examples=_examples(pipe.tokenizer, [*CAPTIONS[:-1], "Snow."]))
    with pytest.raises(AdapterError, match="not a Paint text-feature cache"):
        load_text_features(tmp_path, pipe.text_encoder, pipe.tokenizer)
    # the streamed examples of the same rows are the same examples: the cache is not stale for them
    rows = [{"image": png_bytes(i, (20, 24)), "caption": caption} for i, caption in enumerate(CAPTIONS)]
    stream = A.prepare_stage_dataset("paint-align", A.load_rows(rows, streaming=True), pipe.tokenizer)
    assert len(load_text_features(folder, pipe.text_encoder, pipe.tokenizer, examples=stream).dataset) == 4
    # the bridge may have been trained since: the cache stands for CPM-Bee only
    with torch.no_grad():
        other = _fresh(paint)
        other.text_encoder.projection.weight.mul_(2.0)
    assert len(load_text_features(folder, other.text_encoder, other.tokenizer, examples=examples).dataset) == 4
    # building: never into a folder holding something else; a cache is replaced with overwrite only
    before = (folder / TEXT_CACHE_RECORD).read_text()
    with pytest.raises(AdapterError, match="overwrite=True to replace"):
        cache_text_features(examples, pipe.text_encoder, pipe.tokenizer, folder)
    (tmp_path / "mine.txt").write_text("mine")
    with pytest.raises(AdapterError, match="is not empty"):
        cache_text_features(examples, pipe.text_encoder, pipe.tokenizer, tmp_path, overwrite=True)
    assert (folder / TEXT_CACHE_RECORD).read_text() == before
    small = cache_text_features(examples.select([0]), pipe.text_encoder, pipe.tokenizer, folder, overwrite=True)
    assert len(small.dataset) == 1 and json.loads((folder / TEXT_CACHE_RECORD).read_text())["num_examples"] == 1
    with pytest.raises(AdapterError, match="takes Paint examples"):
        cache_text_features(A.prepare_text_dataset([{"text": "a"}], pipe.tokenizer), pipe.text_encoder,
                            pipe.tokenizer, tmp_path / "x")


def test_the_cache_is_refused_where_cpmbee_trains(built, paint):
    pipe, cache = built["pipe"], built["cache"]
    batch = cache.collator(pipe.tokenizer, resolution=SIZE)([cache.dataset[0], cache.dataset[1]])
    adapter = A.add_paint_adapter(_fresh(paint), r=2, lora_alpha=4)  # LoRA on CPM-Bee: it trains
    with pytest.raises(AdapterError, match="this run trains it"):
        adapter(**batch)
    with pytest.raises(ValueError, match="the cache's collator"):
        A.stage_collator("paint-align", pipe.tokenizer, resolution=SIZE)([cache.dataset[0]])


def test_script_builds_reuses_and_rebuilds_the_cache(paint, tmp_path, capsys, caplog):
    """``train_mpm_stage.py --stage paint-align --text-feature-cache DIR``: the first run builds the cache, a second
    one on the same data reuses it (the files stay as they were), one on changed captions rebuilds it with a warning;
    the option with a stage that trains CPM-Bee (or none of Paint) is a usage error."""
    from adapter_helpers import load_example

    script = load_example("train_mpm_stage")
    data = tmp_path / "captions.jsonl"

    def write(captions):
        lines = []
        for i, caption in enumerate(captions):
            (tmp_path / f"{i}.png").write_bytes(png_bytes(i, (20, 24)))
            lines.append(json.dumps({"image": f"{i}.png", "caption": caption}))
        data.write_text("\n".join(lines) + "\n", encoding="utf-8")

    cache = tmp_path / "cache"
    common = ["--stage", "paint-align", "--model", str(paint["root"] / "hf"), "--data", str(data), "--image-folder",
              str(tmp_path), "--text-feature-cache", str(cache), "--resolution", str(SIZE), "--use-cpu",
              "--max-steps", "1", "--per-device-train-batch-size", "2", "--disable-tqdm", "true", "--report-to", "none"]
    write(CAPTIONS)
    assert script.main([*common, "--output-dir", str(tmp_path / "a")]) == 0
    record = json.loads((cache / TEXT_CACHE_RECORD).read_text())
    assert record["num_examples"] == len(CAPTIONS)
    stamps = {path.name: path.stat().st_mtime_ns for path in cache.iterdir()}
    assert script.main([*common, "--output-dir", str(tmp_path / "b")]) == 0
    assert {path.name: path.stat().st_mtime_ns for path in cache.iterdir()} == stamps  # reused, not rewritten
    write([*CAPTIONS[:-1], "Snow on a roof."])
    with caplog.at_level("WARNING", logger="viscpm.adapters.paint"):
        assert script.main([*common, "--output-dir", str(tmp_path / "c")]) == 0
    assert "rebuilding the text-feature cache" in caplog.text and "stale" in caplog.text
    assert json.loads((cache / TEXT_CACHE_RECORD).read_text())["examples"] != record["examples"]
    for trained_cpmbee in (["--stage", "text-align"], ["--stage", "paint-align", "--mode", "lora"]):
        capsys.readouterr()
        assert script.main([*common, *trained_cpmbee, "--output-dir", str(tmp_path / "d")]) == 2
        assert "--text-feature-cache stands for a frozen CPM-Bee" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
