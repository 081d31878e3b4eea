#!/usr/bin/env python
"""MpM at toy scale, on the CPU: does a multilingual LLM carry English-only visual training into another language?

    python examples/mpm_toy/mpm_toy.py [--preset full|small] [--output-dir runs/mpm-toy] [--seed 0]

1. Two tiny CPM-Bees are trained from scratch (stage ``text-align``, full) on synthetic text about scenes (a coloured
   shape on one side): the *bilingual* one on English, on Lumi (a made-up language with its own words and word
   order, a consistent lexicon) and on parallel English-Lumi sentences; the *baseline* on the English rows alone (it
   never sees Lumi). In the text, a scene's description sits where VisCPM-Chat puts the image (the ``image`` field
   of the chat prompt), and questions about colour, shape and side are answered from it.
2. Each LLM gets a tiny BEiT-3 vision encoder, queries and mapping (VisCPM-Chat's architecture) trained with the
   LLM frozen on rendered images with English captions only (stage ``chat-align``, MpM's stage 1).
3. Both are asked about new renders, in English and (zero-shot) in Lumi. An answer is right when it is the asked
   colour / shape / side, in either language; the table also gives the share of answers in Lumi.
4. Stage 2 (``chat-instruct``, all weights) on English instruction conversations, with 0 % and with each share of
   ``--translated`` (default 1 %, 3 % and 5 %) of them translated to Lumi: the effect of a little translated data.

Prints the table and writes it with the settings to ``OUTPUT_DIR/results.json``. Everything goes through viscpm's
stage presets (`viscpm.adapters.stages`) and `VisCPMChat`; only the learning rates and step counts are the toy's.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path

COLOURS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 215), "yellow": (225, 200, 30)}
SHAPES = ("circle", "square", "triangle")
SIDES = ("left", "right")
SCENES = list(product(COLOURS, SHAPES, SIDES))
"""Every scene: (colour, shape, side); 24 in all."""

LUMI = {"red": "rof", "green": "vani", "blue": "sel", "yellow": "kuma", "circle": "dob", "square": "tef",
        "triangle": "milo", "left": "sinu", "right": "dara"}
"""The lexicon: English word -> Lumi word."""

QUESTIONS = {  # kind -> (English, Lumi)
    "describe": ("Describe the image briefly.", "Miru lo nasa."),
    "colour": ("What colour is the shape?", "Ke vosa ne forma?"),
    "shape": ("What shape is it?", "Ke forma ne?"),
    "side": ("Which side is it on?", "Ke lado ne?"),
}
ATTRIBUTE = {"colour": 0, "shape": 1, "side": 2}
LANGUAGES = ("en", "lumi")


def caption(scene, language: str) -> str:
    """A scene in words: English "a red circle on the left"; Lumi puts the noun first: "dob rof ta sinu"."""
    colour, shape, side = scene
    if language == "en":
        return f"a {colour} {shape} on the {side}"
    return f"{LUMI[shape]} {LUMI[colour]} ta {LUMI[side]}"


def answer(scene, kind: str, language: str) -> str:
    """The answer to question ``kind`` about ``scene`` in ``language``."""
    if kind == "describe":
        return caption(scene, language)
    word = scene[ATTRIBUTE[kind]]
    return word if language == "en" else LUMI[word]


def question(kind: str, language: str) -> str:
    return QUESTIONS[kind][LANGUAGES.index(language)]


# ---------------------------------------------------------------------------------------------------------------------
# Text, vocabulary and images
# ---------------------------------------------------------------------------------------------------------------------

SPECIALS = ["<pad>", "<unk>", "<mask>", "<sep>", "</n>", "</_>", "<s>", "</s>", "<root>", "<ans>", "<option>"]


def write_vocab(path: Path) -> None:
    """A CPM-Bee vocabulary (``vocab.txt`` format) of the specials and every word and sign the toy writes."""
    words = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.?:")
    texts = [caption(scene, language) for scene in SCENES for language in LANGUAGES]
    texts += [text for pair in QUESTIONS.values() for text in pair] + ["translate", "User: ", "AI: "]
    for text in texts:
        for word in text.split():
            words.add(word.rstrip(".?:"))
    path.write_text("\n".join(SPECIALS + sorted(words - {""})) + "\n", encoding="utf-8")


def text_prompt(row: dict) -> dict:
    """The CPM-Bee dict of one text row: a question about a scene given as text in the chat prompt's ``image``
    field (where VisCPM-Chat has its image slots), or a translation."""
    from viscpm import CpmBeeTokenizer

    escape = CpmBeeTokenizer.escape
    if row["kind"] == "translate":
        return {"instruction": "translate", "input": escape(row["source"]), "<ans>": escape(row["target"])}
    return {"image": escape(row["scene"]), "context": "", "question": escape(row["question"]),
            "<ans>": escape(row["answer"])}


def text_rows(bilingual: bool, code_switch: bool = True) -> list[dict]:
    """The LLM's corpus: questions about each scene in English (and Lumi), plus (bilingual) parallel sentences and,
    with ``code_switch``, questions in one language about a scene described in the other (answered in the
    question's language), as a multilingual LLM meets mixed-language text."""
    languages = LANGUAGES if bilingual else ("en",)
    pairs = [(language, language) for language in languages]
    if bilingual and code_switch:
        pairs += [("en", "lumi"), ("lumi", "en")]
    rows = [{"kind": "qa", "scene": caption(scene, described), "question": question(kind, asked),
             "answer": answer(scene, kind, asked), "source": "", "target": ""}
            for scene in SCENES for kind in QUESTIONS for described, asked in pairs]
    if bilingual:
        translations = [(caption(scene, "en"), caption(scene, "lumi")) for scene in SCENES]
        translations += [tuple(QUESTIONS[kind]) for kind in QUESTIONS] + list(LUMI.items())
        for english, lumi in translations:
            for source, target in ((english, lumi), (lumi, english)):
                rows.append({"kind": "translate", "scene": "", "question": "", "answer": "",
                             "source": source, "target": target})
    return rows


def render(scene, rng: random.Random, size: int):
    """An image of ``scene``: the shape, of random size and place within its half, on a noisy grey background."""
    from PIL import Image, ImageDraw

    colour, shape, side = scene
    grey = rng.randint(120, 136)
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(0.16, 0.24) * size
    cx = rng.uniform(0.12 * size + radius, 0.5 * size - 0.02 * size) if side == "left" else \
        rng.uniform(0.52 * size, 0.88 * size - radius)
    cx = min(max(cx, radius), size - radius)
    cy = rng.uniform(radius, size - radius)
    fill = tuple(min(255, max(0, value + rng.randint(-15, 15))) for value in COLOURS[colour])
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    return image


def write_images(folder: Path, per_scene: int, seed: int, size: int) -> list[tuple[str, tuple]]:
    """``per_scene`` renders of every scene in ``folder``: [(file name, scene)]."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    items = []
    for index, scene in enumerate(SCENES):
        for copy in range(per_scene):
            name = f"{index:02d}-{copy:03d}.png"
            render(scene, rng, size).save(folder / name)
            items.append((name, scene))
    return items


# ---------------------------------------------------------------------------------------------------------------------
# Models and stages
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Preset:
    text_steps: int
    align_steps: int
    instruct_steps: int
    renders: int  # training renders per scene
    test_renders: int  # test renders per scene
    batch_size: int = 16
    hidden: int = 64
    layers: int = 2
    vision_hidden: int = 64
    vision_layers: int = 4
    query_num: int = 8
    image_size: int = 32
    patch_size: int = 8
    text_lr: float = 3e-3
    align_lr: float = 1e-3
    instruct_lr: float = 3e-4


PRESETS = {
    "full": Preset(text_steps=1500, align_steps=1500, instruct_steps=400, renders=24, test_renders=6),
    "small": Preset(text_steps=400, align_steps=400, instruct_steps=0, renders=8, test_renders=2),
}


def tiny_llm(vocab_size: int, preset: Preset, seed: int):
    import torch

    from viscpm import CpmBeeConfig, CpmBeeForCausalLM

    torch.manual_seed(seed)
    config = CpmBeeConfig(vocab_size=vocab_size, hidden_size=preset.hidden, num_hidden_layers=preset.layers,
                          num_attention_heads=4, head_dim=preset.hidden // 4, intermediate_size=2 * preset.hidden,
                          position_bias_num_buckets=32, position_bias_num_segment_buckets=32,
                          position_bias_max_distance=128, rotary_dtype="float32")
    return CpmBeeForCausalLM(config)


def chat_model(llm, tokenizer, preset: Preset, seed: int):
    """VisCPM-Chat around ``llm`` (its weights copied in), with a fresh vision encoder, queries and mapping."""
    import torch

    from viscpm import (VisCPMChatConfig, VisCPMChatForConditionalGeneration, VisCPMChatProcessor,
                        VisCPMImageProcessor, VisCPMVisionConfig)

    torch.manual_seed(seed)
    vision = VisCPMVisionConfig(hidden_size=preset.vision_hidden, num_hidden_layers=preset.vision_layers, num_attention_heads=4,
                                intermediate_size=2 * preset.vision_hidden, image_size=preset.image_size,
                                patch_size=preset.patch_size, max_query_positions=preset.query_num + 2)
    config = VisCPMChatConfig(vision_config=vision.to_dict(), text_config=llm.config.to_dict(),
                              query_num=preset.query_num)
    model = VisCPMChatForConditionalGeneration(config)
    model.language_model.load_state_dict(llm.state_dict())
    size = {"height": preset.image_size, "width": preset.image_size}
    processor = VisCPMChatProcessor(VisCPMImageProcessor(size=size), tokenizer, query_num=preset.query_num)
    return model, processor


def _arguments(output: Path, steps: int, lr: float, preset: Preset, seed: int) -> dict:
    return dict(output_dir=str(output), max_steps=steps, learning_rate=lr, per_device_train_batch_size=preset.batch_size,
                lr_scheduler_type="cosine", warmup_steps=min(50, steps // 10), logging_steps=max(1, steps // 5),
                save_strategy="no", report_to=[], seed=seed, data_seed=seed, use_cpu=True, disable_tqdm=True,
                dataloader_num_workers=0)


def train_llm(tokenizer, rows: list[dict], output: Path, preset: Preset, seed: int):
    """Stage ``text-align`` (full): a CPM-Bee from scratch on ``rows``."""
    import datasets

    from viscpm.adapters import prepare_text_dataset, stages

    data = prepare_text_dataset(datasets.Dataset.from_list(rows), tokenizer, build_prompt=text_prompt)
    model = tiny_llm(len(tokenizer), preset, seed)
    args = _arguments(output, preset.text_steps, preset.text_lr, preset, seed)
    model, result = stages.train_stage(model, data, "text-align", processor=tokenizer, overwrite=True, **args)
    return model.eval(), result.training_loss


def train_chat(model, processor, stage: str, rows: list[dict], images: Path, output: Path, steps: int, lr: float,
               preset: Preset, seed: int):
    """Stage ``chat-align`` (image-caption rows) or ``chat-instruct`` (conversations), all it trains in full."""
    import datasets

    from viscpm.adapters import stages

    data = stages.prepare_stage_dataset(stage, datasets.Dataset.from_list(rows), processor, image_folder=images)
    args = _arguments(output, steps, lr, preset, seed)
    model, result = stages.train_stage(model, data, stage, processor=processor, overwrite=True, **args)
    return model.eval(), result.training_loss


def evaluate(model, processor, items, images: Path) -> dict:
    """Accuracy and share of Lumi answers per question language, over ``items`` and every attribute question."""
    from PIL import Image

    from viscpm import VisCPMChat

    chat = VisCPMChat(model.eval(), processor)
    results = {}
    for language in LANGUAGES:
        right = lumi = total = 0
        per_kind = {}
        for kind in ATTRIBUTE:
            before = right
            for start in range(0, len(items), 32):
                batch = items[start:start + 32]
                pictures = [Image.open(images / name).convert("RGB") for name, _ in batch]
                replies = chat.batch_chat(pictures, [question(kind, language)] * len(batch), num_beams=1,
                                          do_sample=False, max_new_tokens=6)
                for (_, scene), reply in zip(batch, replies):
                    said = reply[0].strip()
                    right += said in (answer(scene, kind, "en"), answer(scene, kind, "lumi"))
                    lumi += said in LUMI.values()
                    total += 1
            per_kind[kind] = (right - before) / len(items)
        results[language] = {"accuracy": right / total, "lumi_answers": lumi / total, "questions": total,
                             "by_question": per_kind}
    return results


def instruction_rows(items, translated: float, seed: int) -> list[dict]:
    """Stage-2 conversations about the training renders, one question each, in English, ``translated`` of them in
    Lumi (question and answer)."""
    rng = random.Random(seed)
    rows = []
    for name, scene in items:
        kind = rng.choice(list(QUESTIONS))
        language = "lumi" if rng.random() < translated else "en"
        rows.append({"image": name, "conversations": [
            {"from": "human", "value": question(kind, language)},
            {"from": "gpt", "value": answer(scene, kind, language)},
        ]})
    return rows


def run(preset_name: str = "full", output_dir: str | Path = "runs/mpm-toy", seed: int = 0,
        translated: tuple[float, ...] = (0.01, 0.03, 0.05), code_switch: bool = True) -> dict:
    """The whole experiment; returns (and writes) the results."""
    import copy

    import torch

    from viscpm import CpmBeeTokenizer

    torch.set_num_threads(max(1, torch.get_num_threads()))
    preset = PRESETS[preset_name]
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    write_vocab(output / "vocab.txt")
    tokenizer = CpmBeeTokenizer(str(output / "vocab.txt"))
    train_items = write_images(output / "train-images", preset.renders, seed, preset.image_size)
    test_items = write_images(output / "test-images", preset.test_renders, seed + 1, preset.image_size)
    captions = [{"image": name, "caption": caption(scene, "en")} for name, scene in train_items]
    started = time.perf_counter()
    table, losses = [], {}

    def log(message):
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    for llm_name, bilingual in (("bilingual", True), ("English-only", False)):
        llm, losses[f"text {llm_name}"] = train_llm(tokenizer, text_rows(bilingual, code_switch), output /
                                                    f"llm-{llm_name}", preset, seed)
        log(f"LLM {llm_name}: loss {losses[f'text {llm_name}']:.3f}")
        model, processor = chat_model(llm, tokenizer, preset, seed)
        model, losses[f"align {llm_name}"] = train_chat(model, processor, "chat-align", captions,
                                                        output / "train-images", output / f"align-{llm_name}",
                                                        preset.align_steps, preset.align_lr, preset, seed)
        scores = evaluate(model, processor, test_items, output / "test-images")
        log(f"{llm_name}, stage 1: {scores}")
        table.append({"llm": llm_name, "visual training": "stage 1 (English captions)", **_flat(scores)})
        for share in (0.0, *translated) if bilingual else (0.0,):
            if not preset.instruct_steps:
                break
            tuned, loss = train_chat(copy.deepcopy(model), processor, "chat-instruct",
                                     instruction_rows(train_items, share, seed), output / "train-images",
                                     output / f"instruct-{llm_name}-{share:g}", preset.instruct_steps,
                                     preset.instruct_lr, preset, seed)
            losses[f"instruct {llm_name} {share:g}"] = loss
            scores = evaluate(tuned, processor, test_items, output / "test-images")
            log(f"{llm_name}, stage 2 ({share:.0%} Lumi): {scores}")
            table.append({"llm": llm_name, "visual training": f"+ stage 2 (English, {share:.0%} Lumi)",
                          **_flat(scores)})
    results = {"preset": preset_name, "settings": asdict(preset), "seed": seed, "translated": list(translated),
               "code_switch": code_switch, "table": table,
               "training_losses": losses, "seconds": round(time.perf_counter() - started, 1),
               "test_questions_per_language": len(test_items) * len(ATTRIBUTE)}
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def _flat(scores: dict) -> dict:
    return {"en accuracy": scores["en"]["accuracy"], "Lumi accuracy (zero-shot)": scores["lumi"]["accuracy"],
            "Lumi answers to Lumi questions": scores["lumi"]["lumi_answers"]}


def markdown_table(results: dict) -> str:
    rows = results["table"]
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(f"{value:.1%}" if isinstance(value, float) else str(value)
                                        for value in row.values()) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--output-dir", default="runs/mpm-toy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-code-switch", dest="code_switch", action="store_false",
                        help="leave the mixed-language questions out of the bilingual LLM's text")
    parser.add_argument("--translated", type=float, nargs="+", default=[0.01, 0.03, 0.05],
                        help="shares of stage-2 conversations translated to Lumi, one run each (default 0.01 0.03 "
                             "0.05)")
    args = parser.parse_args(argv)
    for share in args.translated:
        if not 0 < share <= 1:
            parser.error(f"--translated must be in (0, 1], got {share}")
    results = run(args.preset, args.output_dir, args.seed, args.translated, args.code_switch)
    print(markdown_table(results))
    print(f"\n{results['test_questions_per_language']} test questions per language; {results['seconds']} s; "
          f"results in {Path(args.output_dir) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
