"""CpmBeeTokenizer against the original VisCPM tokenizer, `convert_data_to_id`, batch packing and collater (the
tests that take `orig` or `packer` are oracle tests)."""

import copy
import importlib.util
import os
import random

import numpy as np
import pytest
import torch


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_module():
    # Loaded by path: the file must stand alone (it ships as remote code) and `viscpm.modeling`
    # imports the model as well.
    spec = importlib.util.spec_from_file_location(
        "cpmbee_tokenization_under_test", os.path.join(ROOT, "modeling", "tokenization_cpmbee.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CpmBeeTokenizer = _load_module().CpmBeeTokenizer
V = 86583


@pytest.fixture(scope="module")
def tok(vocab_file):
    return CpmBeeTokenizer(vocab_file)


@pytest.fixture(scope="module")
def orig(oracle):
    return oracle.OriginalTokenizer()


@pytest.fixture(scope="module")
def packer(orig):
    from VisCPM.generation.vllm_bee import VLLMCPMBeeGeneration

    generation = VLLMCPMBeeGeneration.__new__(VLLMCPMBeeGeneration)
    generation.tokenizer = orig
    generation.device = "cpu"
    return generation


GENERATION_ITEMS = [
    {"question": "你好，世界", "<ans>": ""},
    {"caption": "A photo of a cat sitting on the mat.", "objects": ""},  # no <ans>: all context
    {"context": "User: 天气怎么样？\nAI: 很好\n", "question": "mixed 中英 text 123 ok?", "<ans>": ""},
    {"image": "<unk>" * 64, "context": "", "question": "这是什么？", "<ans>": ""},
    {"q": "表情 😀🎉 and 😀 again", "<ans>": ""},
    {"q": "𠀀𠀁 and 𠀂 then 𠀀𠀁 again 𠀂 𠀃", "<ans>": ""},
    {"q": "a <<b>> c << d <<<< <<s> e", "<ans>": ""},
    {"q": "<unk_2> x <unk_0> <option_1> <option_2> <mask_3> <unk_2> 𠀀", "<ans>": ""},
    {"q": "<s></s><root><eod><ans><unk><option>", "<ans>": ""},
    {"a": {"b": "1", "c": {"d": "深层"}}, "e": "f", "<ans>": ""},
    {"": "", "x": "", "<ans>": ""},
    {"<ans>": "", "question": "答案在前面"},
    {"b": "2", "a": "1", "<ans>": ""},
    {"a": "1", "b": "2", "<ans>": ""},
    {"q": "选择一个", "<ans>": {"answer": "", "reason": {"short": "", "long": ""}}},
    {"q": "hi", "<ans>": "the answer text 𠀄 is ignored"},
    {"𠀀key": "value 𠀀 𠀅", "<option_4>": "o", "<ans>": ""},
    {"<ans>": "", "q": "<ans_5> and <ans_1> and <ans_5>"},
    {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": {"j": "deep"}}}}}}}}}, "<ans>": ""},
    {"q": "line1\nline2\t tab  two spaces   ", "<ans>": ""},
    {"q": "rawdownloadcloneembedreportprint 长文本" * 20, "extra": {"k": "v"}, "<ans>": ""},
    {"<ans>": {"x": "", "y": ""}, "z": "after"},
]

PLAIN_TEXTS = [
    "你好，世界！",
    "Hello world, this is CPM-Bee.",
    "mixed 中英文 text with numbers 12345 and symbols #$%^&*()",
    "line\nbreaks\n\nand  spaces ",
    "literal <<tag>> and <<<< and <<s>",
    "<s>special</s><unk>",
    "",
    "rawdownloadcloneembedreportprint",
]


def _pairs(ids, ext_ids, ext_sub):
    """Raw ids -> (base id, sub) through a batch ext table."""
    out = []
    for index in ids:
        index = int(index)
        out.append((int(ext_ids[index - V]), int(ext_sub[index - V])) if index >= V else (index, 0))
    return out


def _oracle_generation(packer, items):
    """Expected rows from the original's `_process_list` (items with "<ans>") or `convert_data_to_id`."""
    padded, info = packer._process_list(copy.deepcopy(items))
    rows = []
    for b, item in enumerate(items):
        real = padded["context"][b] != 0
        base = padded["input_ids"][b][real].tolist()
        subs = padded["input_id_subs"][b][real].tolist()
        segs = padded["segment_ids"][b][real].tolist()
        n = int(padded["num_segments"][b][real][0])
        rel = padded["segment_rel"][b][: n * n].view(n, n)
        first_answer = int(info[b]["predict_segments"][0][0])
        rows.append(
            dict(
                pairs=list(zip(base, subs)) + [(6, 0)],
                segs=segs + [first_answer],
                context=[1] * len(base) + [0],
                rel=rel,
                ext_table=info[b]["ext_table"],
                answers=[
                    (int(seg), tuple(info[b]["answer_placeholders"][a - 1])) for seg, a in info[b]["predict_segments"]
                ],
            )
        )
    table = list(zip(padded["batch_ext_table_ids"].tolist(), padded["batch_ext_table_sub"].tolist()))
    return rows, table


def _check_generation(tok, orig, packer, items):
    with_ans = [item for item in items if "<ans>" in item]
    assert len(with_ans) == len(items)
    enc = tok(items, return_tensors="pt", padding=True)
    rows, table = _oracle_generation(packer, items)
    ext_ids, ext_sub = enc["ext_table_ids"][0], enc["ext_table_sub"][0]
    E = len(table)
    assert list(zip(ext_ids[:E].tolist(), ext_sub[:E].tolist())) == table
    for b, row in enumerate(rows):
        assert torch.equal(enc["ext_table_ids"][b], ext_ids) and torch.equal(enc["ext_table_sub"][b], ext_sub)
        mask = enc["attention_mask"][b].bool()
        assert mask.sum() == len(row["pairs"]) and bool(mask[-1])  # left padding
        assert _pairs(enc["input_ids"][b][mask], ext_ids, ext_sub) == row["pairs"]
        assert enc["segment_ids"][b][mask].tolist() == row["segs"]
        assert enc["context_mask"][b][mask].tolist() == row["context"]
        n = row["rel"].shape[0]
        assert torch.equal(enc["segment_rel"][b][:n, :n], row["rel"].long())
        assert not enc["segment_rel"][b][n:].any() and not enc["segment_rel"][b][:, n:].any()
        expected_mask = [int(V + e in row["ext_table"]) for e in range(E)]
        assert enc["ext_table_mask"][b][:E].tolist() == expected_mask
        assert not enc["ext_table_mask"][b][E:].any()  # `<ans_N>` typed into a context
        assert int(enc["unk_allowed"][b]) == int(orig.unk_id in row["ext_table"])
        assert enc["input_ids"][b][~mask].eq(0).all() and enc["context_mask"][b][~mask].eq(0).all()
        assert enc["segment_ids"][b][~mask].eq(0).all()
    tables = tok.get_ext_tables(items)
    answers = tok.answer_segments(items)
    for b, row in enumerate(rows):
        assert {k: v for k, v in tables[b].items() if k < V + E} == row["ext_table"]
        assert answers[b] == [seg for seg, _ in row["answers"]]
    assert tok.answer_segments(items, return_paths=True) == [row["answers"] for row in rows]
    return enc


@pytest.mark.parametrize("index", range(len(GENERATION_ITEMS)))
def test_generation_layout_single(tok, orig, packer, index):
    from oracle import convert_data_to_id

    item = GENERATION_ITEMS[index]
    if "<ans>" in item:
        _check_generation(tok, orig, packer, [item])
        return
    enc = tok(item, return_tensors="pt")
    ids, subs, context, segs, rel, n, _, _ = convert_data_to_id(orig, copy.deepcopy(item), shuffle_answer=False)
    assert enc["input_ids"][0].tolist() == ids.tolist() and not subs.any()
    assert enc["segment_ids"][0].tolist() == segs.tolist()
    assert enc["context_mask"][0].tolist() == context.tolist() == [1] * len(ids)
    assert enc["segment_rel"][0].tolist() == rel.reshape(n, n).tolist()
    assert enc["ext_table_ids"].shape == (1, 0) and enc["unk_allowed"].tolist() == [0]


def test_generation_layout_batched(tok, orig, packer):
    items = [item for item in GENERATION_ITEMS if "<ans>" in item]
    enc = _check_generation(tok, orig, packer, items)
    assert enc["input_ids"].shape[0] == len(items) and enc["segment_rel"].shape[0] == len(items)
    small = [GENERATION_ITEMS[5], GENERATION_ITEMS[0], GENERATION_ITEMS[16], GENERATION_ITEMS[7]]
    _check_generation(tok, orig, packer, small)


def test_ext_table_details(tok):
    # First unknown piece is plain <unk> (sub 0); later distinct ones get subs 1, 2; repeats reuse them.
    enc = tok({"q": "𠀀 x 𠀁 y 𠀀 <unk_3>", "<ans>": ""}, return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    assert ids.count(1) == 2 and enc["unk_allowed"].tolist() == [1]
    assert enc["ext_table_ids"].tolist() == [[1, 1]] and enc["ext_table_sub"].tolist() == [[1, 2]]
    assert ids.count(V) == 1 and ids.count(V + 1) == 1
    # `<ans_N>` typed into a context after "<ans>": an extra entry, owned by no row.
    enc = tok([{"<ans>": "", "q": "<ans_7>"}, {"q": "𠀀 𠀁", "<ans>": ""}], return_tensors="pt", padding=True)
    assert enc["ext_table_ids"][0].tolist() == [1, 9] and enc["ext_table_sub"][0].tolist() == [1, 1]
    assert enc["ext_table_mask"].tolist() == [[0, 0], [1, 0]]
    assert (enc["input_ids"][0] == V + 1).sum() == 1
    # No ext entries: [B, 0].
    enc = tok(["abc", {"a": "b"}], return_tensors="pt", padding=True)
    assert enc["ext_table_ids"].shape == (2, 0) and enc["ext_table_mask"].dtype == torch.long


def test_plain_strings(tok, orig):
    from oracle import convert_data_to_id

    for text in PLAIN_TEXTS:
        assert tok.encode(text) == orig.encode(text)[0], text
        assert tok.tokenize(text) == [t.token for t in orig.tokenize(text)], text
    for text in PLAIN_TEXTS + ["𠀀𠀁 a 𠀂 𠀀𠀁 😀 <unk_1> <option_2>"]:
        # A plain string alone is encoded as transformers tokenizers do: its ids (unknown pieces as <unk>).
        assert dict(tok(text)) == {"input_ids": tok.encode(text), "attention_mask": [1] * len(tok.encode(text))}
        # Beside a CPM-Bee dict it is CPM-Bee text: its tokens with the original's ext numbering, segment 0.
        enc = tok([text, {"a": ""}], return_tensors="pt", padding=True, padding_side="right")
        ids, subs, _, segs, _, _, _, _ = convert_data_to_id(orig, text, shuffle_answer=False)
        leaf = segs == 1
        expected = list(zip(ids[leaf].tolist(), subs[leaf].tolist()))[1:-1]  # drop <s> ... </s>
        real = enc["attention_mask"][0].bool()
        assert _pairs(enc["input_ids"][0][real], enc["ext_table_ids"][0], enc["ext_table_sub"][0]) == expected
        assert not enc["segment_ids"][0].any() and enc["context_mask"][0][real].all()
        assert enc["segment_rel"][0].tolist() == [[0] * 3 for _ in range(3)]
    assert [t.token for t in orig.tokenize("𠀀𠀁 a 😀")] == tok.tokenize("𠀀𠀁 a 😀")
    assert tok.encode("𠀀") == [1]


def _check_training(tok, orig, items):
    """Training layout vs `convert_data_to_id` + the original collater (ext ids compared as (id, sub) pairs)."""
    from oracle import convert_data_to_id
    from VisCPM.utils.utils import CPMBeeCollater

    enc = tok(items, return_labels=True, padding_side="right", return_tensors="pt", padding=True)
    ext_ids, ext_sub = enc["ext_table_ids"][0], enc["ext_table_sub"][0]
    batch = []
    for item in items:
        ids, subs, context, segs, rel, n, _, _ = convert_data_to_id(orig, copy.deepcopy(item), shuffle_answer=False)
        batch.append(
            {
                "input_ids": torch.from_numpy(ids)[None],
                "input_id_subs": torch.from_numpy(subs)[None],
                "context": torch.from_numpy(context)[None],
                "segment_ids": torch.from_numpy(segs)[None],
                "segment_rel_offset": torch.zeros(1, len(ids), dtype=torch.int32),
                "segment_rel": torch.from_numpy(rel)[None],
                "sample_ids": torch.zeros(1, len(ids), dtype=torch.int32),
                "num_segments": torch.full((1, len(ids)), n, dtype=torch.int32),
                "raw_data": [item],
            }
        )
    collated = CPMBeeCollater(orig, enc["input_ids"].shape[1] + 3)(batch)
    c_ids, c_sub = collated["ext_table_ids"], collated["ext_table_sub"]
    for b, one in enumerate(batch):
        length = one["input_ids"].shape[1]
        assert enc["attention_mask"][b].sum() == length and bool(enc["attention_mask"][b][0])  # right padding
        pairs = list(zip(one["input_ids"][0].tolist(), one["input_id_subs"][0].tolist()))
        assert _pairs(enc["input_ids"][b][:length], ext_ids, ext_sub) == pairs
        assert enc["context_mask"][b][:length].tolist() == one["context"][0].tolist()
        assert enc["segment_ids"][b][:length].tolist() == one["segment_ids"][0].tolist()
        n = int(one["num_segments"][0, 0])
        assert enc["segment_rel"][b][:n, :n].flatten().tolist() == one["segment_rel"][0].tolist()
        target = collated["target"][b][:length].tolist()
        labels = enc["labels"][b][:length].tolist()
        assert [t if t < 0 else _pairs([t], c_ids, c_sub)[0] for t in target] == [
            t if t < 0 else _pairs([t], ext_ids, ext_sub)[0] for t in labels
        ]
        assert enc["labels"][b][length:].eq(-100).all()
    return enc


def test_training_layout_labels(tok, orig):
    items = [
        {"question": "你好 𠀀", "<ans>": "答案 𠀁 and 𠀀"},
        {"<ans>": {"a": "x 𠀂", "b": {"c": ""}}, "q": "question 𠀁"},
        {"a": "no answer"},
        {"image": "<unk>" * 8, "q": "<option_1> <unk_3>", "<ans>": "<s> <option_2> 𠀃"},
        {"<ans>": "answer <ans_1>", "q": "<ans_3> typed"},  # <ans_3> gets sub 1
    ]
    enc = _check_training(tok, orig, items)
    assert (enc["labels"] != -100).any() and enc["labels"][2].eq(-100).all()
    assert enc["ext_table_mask"][:, -1].eq(0).all() and enc["ext_table_ids"][0, -1] == 9  # the typed <ans_3>


_POOL = ["你", "好", "a", "the ", " ", "\n", "<<", "𠀀", "𠀁", "𠀂", "😀", "<unk>", "<unk_1>", "<unk_2>",
         "<option_3>", "<s>", "</s_1>", "<ans_2>", "<mask_4>", "xyz", "123", "，", "\t", "<root_1>"]


def _random_item(rng, depth=1):
    def text():
        return "".join(rng.choice(_POOL) for _ in range(rng.randint(0, 5)))

    item = {}
    for _ in range(rng.randint(1, 3)):
        key = text() if rng.random() < 0.7 else rng.choice(["image", "q", ""])
        item[key] = text() if rng.random() < 0.6 or depth > 2 else _random_item(rng, depth + 1)
    if depth == 1:
        answer = text() if rng.random() < 0.5 else _random_item(rng, 2)
        keys = list(item)
        at = rng.randint(0, len(keys))
        item = {k: item[k] for k in keys[:at]} | {"<ans>": answer} | {k: item[k] for k in keys[at:]}
    return item


def test_random_dicts_match_original(tok, orig, packer):
    rng = random.Random(1234)
    for _ in range(40):
        items = [_random_item(rng) for _ in range(rng.randint(1, 3))]
        _check_generation(tok, orig, packer, items)
        _check_training(tok, orig, items)


def test_padding_options(tok):
    items = [{"a": "short", "<ans>": ""}, {"a": "a much longer context 长一点的", "<ans>": ""}]
    left = tok(items, return_tensors="pt", padding=True)
    right = tok(items, return_tensors="pt", padding=True, padding_side="right")
    for b in range(2):
        assert left["input_ids"][b][left["attention_mask"][b].bool()].tolist() == right["input_ids"][b][
            right["attention_mask"][b].bool()
        ].tolist()
    assert left["attention_mask"][0, 0] == 0 and right["attention_mask"][0, -1] == 0
    assert tok(items, padding="max_length", max_length=40, return_tensors="pt")["input_ids"].shape == (2, 40)
    assert tok(items, pad_to_multiple_of=8, padding=True, return_tensors="pt")["input_ids"].shape[1] % 8 == 0
    as_lists = tok(items)  # the defaults: lists, no padding
    assert isinstance(as_lists["input_ids"][0], list) and len(as_lists["input_ids"][0]) < len(as_lists["input_ids"][1])
    assert tok(items, return_tensors="np", padding=True)["input_ids"].dtype == np.int64
    with pytest.raises(ValueError, match="padding=True"):
        tok(items, return_tensors="pt")


def test_truncation_matches_original(tok, packer):
    item = {"<ans>": "", "q": "这是一个很长的问题" * 5}
    enc = tok(item, truncation=True, max_length=12, return_tensors="pt")
    padded, info = packer._process_list([copy.deepcopy(item)], max_inp_length=12)
    real = padded["context"][0] != 0
    assert enc["input_ids"][0, :-1].tolist() == padded["input_ids"][0][real].tolist()
    assert enc["segment_ids"][0, -1] == int(info[0]["predict_segments"][0][0])
    with pytest.raises(ValueError, match="no answer left"):
        tok({"q": "long question " * 10, "<ans>": ""}, truncation=True, max_length=10)
    assert tok("abc def ghi", truncation=True, max_length=2)["input_ids"] == tok.encode("abc def ghi")[:2]


def test_decode_matches_original(tok, orig):
    text = "你好 <<x>> a<s>b </s>\n 😀 end"
    ids, table = orig.encode(text)  # the emoji is unknown: an ext id of the original's own table
    assert tok.decode(ids, ext_table=table) == orig.decode(ids, table)
    ids = orig.encode("你好 <<x>> a<s>b </s>\n end")[0]
    assert tok.decode(ids) == orig.decode(ids)
    assert tok.decode(tok.encode("a <<b")) == "a <<b"
    assert tok.convert_tokens_to_string(tok.tokenize("<<s> <s>")) == "<<s> <s>"
    assert tok.decode([6, 94, 7], skip_special_tokens=True) == orig.decode([94])
    with pytest.raises(ValueError, match="ext table"):
        tok.decode([V + 3])
    assert tok.decode([V + 3, 1], ext_table={V + 3: "𠀁", 1: "𠀀"}) == "𠀀".join(["𠀁", ""])


def test_decode_answers(tok, orig, packer):
    items = [
        {"q": "𠀀 and 𠀁 and <option_2>", "<ans>": ""},
        {"q": "选择", "<ans>": {"answer": "", "reason": {"short": "", "long": ""}}},
        {"q": "𠀁 only", "<ans>": "ignored"},
    ]
    enc = tok(items, return_tensors="pt", padding=True)
    _, info = packer._process_list(copy.deepcopy(items))
    table = zip(enc["ext_table_ids"][0].tolist(), enc["ext_table_sub"][0].tolist())
    ext_cols = {pair: V + column for column, pair in enumerate(table)}
    hello = tok.encode("你好 <<")
    gen0 = hello + [1, ext_cols[(1, 1)], 7, 0, 0]  # <unk> and the second unknown piece, then eos, pads
    gen1 = tok.encode("A") + [7, 6] + tok.encode("短") + [7, 6]  # third answer never started
    gen2 = [1] + hello  # ran out of tokens without eos
    out = tok.decode_answers(items, [gen0, gen1, gen2])
    assert items[0]["<ans>"] == "" and items[1]["<ans>"]["answer"] == ""  # inputs untouched
    assert out[0]["<ans>"] == orig.decode(gen0[:-3], info[0]["ext_table"]) == "你好 <<𠀀𠀁"
    assert out[1]["<ans>"] == {"answer": "A", "reason": {"short": "短", "long": None}}
    assert out[2]["<ans>"] == orig.decode(gen2, info[2]["ext_table"]) and out[2]["q"] == "𠀁 only"
    # post_process_generation: prompt (left padded) + generated, as from generate().
    width = max(len(gen0), len(gen1), len(gen2))
    generated = torch.tensor([g + [0] * (width - len(g)) for g in (gen0, gen1, gen2)])
    sequences = torch.cat([enc["input_ids"], generated], dim=1)
    assert tok.post_process_generation(items, sequences, enc["input_ids"].shape[1])[:2] == out[:2]
    single = tok.post_process_generation(items[0], sequences[:1], enc["input_ids"].shape[1])
    assert single == out[0]
    # Per-leaf id lists (a per-slot beam search's output) give the same answers.
    slots = [[hello + [1, ext_cols[(1, 1)]]], [tok.encode("A") + [7], tok.encode("短"), []], [[1] + hello]]
    assert tok.decode_answers(items, slots) == out
    assert tok.decode_answers(items[1], slots[1]) == out[1]
    assert tok.decode_answers(items[1], [[7], [], []])["<ans>"] == {"answer": "", "reason": {"short": None, "long": None}}
    assert tok.decode_answers(items[0], torch.tensor(gen0))["<ans>"] == out[0]["<ans>"]
    with pytest.raises(ValueError, match="<ans>"):
        tok.decode_answers({"q": "x"}, [7])
    with pytest.raises(ValueError, match="answer lists"):
        tok.decode_answers(items[0], [[1], [2]])


def test_escape_roundtrip(tok):
    raw = "a <b> << c <"
    escaped = tok.escape(raw)
    assert tok.unescape(escaped) == raw
    assert tok.convert_tokens_to_string(tok.tokenize(escaped)) == escaped
    assert "".join(tok.tokenize(escaped)) == raw


@pytest.mark.parametrize(
    "data, message",
    [
        ({"q": "<abc", "<ans>": ""}, "unterminated special token"),
        ({"q": "abc<", "<ans>": ""}, "dangling '<'"),
        ({"q": "<a<b>", "<ans>": ""}, "'<' inside the special token"),
        ({"q": "<foo>", "<ans>": ""}, "unknown special token '<foo>'"),
        ({"q": "<image_1>", "<ans>": ""}, "base '<image>'"),
        ({"a": {"b": 3}}, r"data\['a'\]\['b'\] must be a str"),
        ({"a": ["x", "y"]}, r"data\['a'\] is a list"),
        ({1: "x"}, "key 1 of data is not a str"),
        ({"q": "x", "<ans>": {}}, "no leaf to predict"),
        ({"q": "x", "<ans>": 5}, r"data\['<ans>'\] must be a str or None"),
        ([], "empty batch"),
        (3, "must be a str or a CPM-Bee dict"),
        ("bad <x", "unterminated"),
    ],
)
def test_bad_inputs(tok, data, message):
    with pytest.raises(ValueError, match=message):
        tok(data)


def test_bad_inputs_more(tok):
    with pytest.raises(ValueError, match="item 1"):
        tok([{"a": "ok"}, {"a": None}])
    with pytest.raises(ValueError, match="return_labels"):
        tok({"a": "b", "<ans>": "c"}, return_labels=True, truncation=True, max_length=4)
    with pytest.raises(ValueError, match="must be a str"):
        tok({"a": "b", "<ans>": None}, return_labels=True)
    with pytest.raises(ValueError, match="text_pair"):
        tok("a", text_pair="b")
    with pytest.raises(ValueError, match="unknown special token"):
        tok.tokenize("<nope_1>")
    assert len(tok({"q": "x", "<ans>": None})["input_ids"]) > 0  # answer leaves may be None


def test_save_and_load(tok, tmp_path, vocab_file):
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "vocab.txt").read_text(encoding="utf-8").split() == open(
        vocab_file, encoding="utf-8"
    ).read().split()
    loaded = CpmBeeTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tok) == tok.vocab_size == V
    assert loaded.get_vocab() == tok.get_vocab() and loaded.padding_side == "left"
    assert (loaded.pad_token_id, loaded.unk_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 6, 7)
    assert loaded.convert_tokens_to_ids("<ans>") == 9
    item = [GENERATION_ITEMS[7], GENERATION_ITEMS[14]]
    a, b = tok(item, return_tensors="pt", padding=True), loaded(item, return_tensors="pt", padding=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_auto_tokenizer(tok, tmp_path):
    # Needs the `viscpm` package importable (it registers the model type "cpmbee").
    import viscpm  # noqa: F401
    from transformers import AutoTokenizer

    viscpm.CpmBeeConfig().save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert type(auto).__name__ == "CpmBeeTokenizer"
    assert auto.encode("你好，世界") == tok.encode("你好，世界")


# ------------------------------------------------------------------ transformers conventions (issue 13, 12-15)


def test_defaults_follow_transformers(tok):
    """Lists unless return_tensors, a single input not batched, no padding unless asked; dicts likewise."""
    one = tok("a cat")
    assert dict(one) == {"input_ids": tok.encode("a cat"), "attention_mask": [1] * len(tok.encode("a cat"))}
    two = tok(["a cat", "the dog barks loudly"])
    assert [len(ids) for ids in two["input_ids"]] == [len(tok.encode("a cat")), len(tok.encode("the dog barks loudly"))]
    padded = tok(["a cat", "the dog barks loudly"], padding=True, return_tensors="pt")
    assert padded["input_ids"].shape == (2, len(tok.encode("the dog barks loudly")))
    assert padded["attention_mask"][0, 0] == 0  # left padding, the tokenizer's side
    assert tok("a cat", return_tensors="pt")["input_ids"].tolist() == [tok.encode("a cat")]
    item = {"q": "𠀀 and 𠀁", "<ans>": ""}
    single, batched = tok(item), tok([item], return_tensors="pt")
    assert single["input_ids"] == batched["input_ids"][0].tolist()
    assert single["segment_rel"] == batched["segment_rel"][0].tolist()
    assert single["ext_table_ids"] == batched["ext_table_ids"][0].tolist() and single["unk_allowed"] == 1
    # A positional second argument is a text pair (refused: CPM-Bee reads one input), never return_tensors.
    with pytest.raises(ValueError, match="text_pair is not supported"):
        tok("a cat", "pt")
    with pytest.raises(ValueError, match="text pairs are not supported"):
        tok([("a", "b")])


def test_added_tokens_are_matched(vocab_file):
    tok = CpmBeeTokenizer(vocab_file)
    assert tok.add_tokens(["[NEW]", "bambam"]) == 2 and tok.add_tokens(["<img_tag>"], special_tokens=True) == 1
    new, bam, tag = (tok.convert_tokens_to_ids(t) for t in ("[NEW]", "bambam", "<img_tag>"))
    assert (new, bam, tag) == (V, V + 1, V + 2) and len(tok) == tok.ext_offset == V + 3
    pieces = tok.tokenize("a[NEW]bbambam <img_tag> <<img_tag>")
    assert pieces[:6] == ["a", "[NEW]", "b", "bambam", " ", "<img_tag>"]
    assert "".join(pieces[6:]) == " <img_tag>" and "<img_tag>" not in pieces[6:]  # `<<` escapes it
    assert tok.decode(tok.encode("x [NEW] <img_tag>")) == "x [NEW] <img_tag>"
    assert tok.decode(tok.encode("x <img_tag>"), skip_special_tokens=True) == "x "
    # In CPM-Bee dicts too; ext ids then start after the added tokens (the model's resized vocabulary).
    enc = tok({"q": "[NEW] 𠀀 𠀁", "<ans>": ""}, return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    assert new in ids and tok.ext_offset in ids and enc["ext_table_ids"].tolist() == [[1]]
    assert tok.decode_answers({"q": "[NEW] 𠀀 𠀁", "<ans>": ""}, [new, tok.ext_offset, tok.eos_token_id]) == {
        "q": "[NEW] 𠀀 𠀁", "<ans>": "[NEW]𠀁"}
    # New special tokens given at init are added (not refused) and matched.
    custom = CpmBeeTokenizer(vocab_file, pad_token="[PAD]", extra_special_tokens=["[SEP_X]"])
    assert custom.pad_token == "[PAD]" and custom.pad_token_id == V and custom.tokenize("a[SEP_X]b") == ["a", "[SEP_X]", "b"]
    assert custom(["a", "a b c"], padding=True)["input_ids"][0][0] == V
    assert custom.tokenize("a[SEP_X]b", split_special_tokens=True) != custom.tokenize("a[SEP_X]b")


def test_optional_outputs_and_words(tok):
    item = {"q": "你好", "<ans>": ""}
    enc = tok([item, {"a": "b", "c": "d", "<ans>": ""}], padding=True, return_special_tokens_mask=True,
              return_token_type_ids=True, return_length=True, return_tensors="pt")
    ids = enc["input_ids"]
    special = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}
    assert enc["special_tokens_mask"].tolist() == [[int(int(i) in special) for i in row] for row in ids]
    assert not enc["token_type_ids"].any() and enc["length"].tolist() == enc["attention_mask"].sum(1).tolist()
    assert "attention_mask" not in tok(item, return_attention_mask=False)
    for option in ("stride", "return_overflowing_tokens", "return_offsets_mapping", "is_split_into_words"):
        with pytest.raises(ValueError, match=f"{option} applies to plain text only"):
            tok(item, **{option: 2 if option == "stride" else True})
    with pytest.raises(TypeError, match="bogus"):
        tok(item, bogus=1)
    # Words are encoded as the words of a sentence (each after a space), alone or in a batch.
    words = ["Hello", "world", "你好", "𠀀"]
    assert tok(words, is_split_into_words=True)["input_ids"] == tok.encode(" " + " ".join(words))
    batch = tok([words, ["one"]], is_split_into_words=True)
    assert batch["input_ids"] == [tok.encode(" " + " ".join(words)), tok.encode(" one")]
    plain = tok("Hello world", return_special_tokens_mask=True)
    assert plain["input_ids"] and plain["special_tokens_mask"] == [0] * len(plain["input_ids"])


def test_chat_template_on_plain_text(tok):
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "hi"}]
    text = tok.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert text == "user: 你好\nassistant: hi\n"
    ids = tok.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=False)
    assert ids == tok.encode(text)
    out = tok.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                  return_tensors="pt")
    assert out["input_ids"].tolist() == [tok.encode(text)]
