"""`viscpm eval llava-bench` and `viscpm.evaluation.llava_bench`, against a stub OpenAI-compatible endpoint.

The stub (a threading `http.server` on 127.0.0.1) plays both the judge and, for most tests, the model answering
(``--model-url``, model ``stub-chat``: it answers "answer to: QUESTION"). The judge's replies are scripted per
question: scores, a reply without scores, a reply slower than the timeout, HTTP 500, a body that is not a chat
completion. Every request is recorded, so the tests count judge calls (resuming must make none for what is done) and
read the prompts the judge got. The bench files are written in tmp_path with tiny PNGs. The last test answers with
a tiny random VisCPM-Chat, both through `viscpm api` (a subprocess) and loaded in-process with ``--model``.
"""

import http.server
import json
import threading
import time

import PIL.Image
import pytest

from viscpm.evaluation import llava_bench as lb

JUDGE = "judge-1"
CAPTIONS = {"a.png": "A black cat sits on a red sofa.", "b.png": ["Two dogs run on a beach.", "The sea is calm."],
            "c.png": "A bowl of noodles with chopsticks."}
QUESTIONS = [  # question_id, image, category, text
    (1, "a.png", "conv", "What colour is the cat?"),
    (2, "a.png", "conv", "猫坐在哪里？"),  # a Chinese bench is the same files, translated
    (3, "b.png", "detail", "Describe the picture in detail."),
    (4, "b.png", "detail", "Describe the sea."),
    (5, "c.png", "complex", "Why are there chopsticks?"),
    (6, "c.png", "complex", "Q500: what could the cook do next?"),
    (7, "c.png", "complex", "Qslow: is the dish hot?"),
    (8, "c.png", "complex", "Qbody: which cuisine is it?"),
]
SCRIPT = {  # question text -> the judge's replies, one per call (the last repeats)
    "What colour is the cat?": ["8 6\nAssistant 2 misses the sofa."],
    "猫坐在哪里？": ["10, 7\n两个回答都可以。"],
    "Describe the picture in detail.": ["**6 3**\nAssistant 2 is vague."],
    "Describe the sea.": ["I cannot score these two answers."],
    "Why are there chopsticks?": ["\n7 7\nequal"],
    "Q500: what could the cook do next?": [("status", 500)],
    "Qslow: is the dish hot?": [("slow", 1.5, "9 9")],
    "Qbody: which cuisine is it?": [("body", b"<html>proxy error</html>")],
}
FIXED = {"Q500: what could the cook do next?": ["5 4\nok"], "Qslow: is the dish hot?": ["6 3\nok"],
         "Qbody: which cuisine is it?": ["8 2\nok"]}
MODEL_CALLS_PER_RUN = len(QUESTIONS)


class Stub:
    """An OpenAI-compatible endpoint on 127.0.0.1: model ``stub-chat`` answers questions, any other model judges by
    `SCRIPT`; ``calls`` records (model, question, payload, headers) of every chat request."""

    def __init__(self, script):
        self.script = {question: list(replies) for question, replies in script.items()}
        self.calls, self.lock = [], threading.Lock()
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body: bytes, kind="application/json"):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", kind)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

            def do_GET(self):
                self._send(200, json.dumps({"object": "list", "data": [{"id": "stub-chat"}]}).encode())

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                question = _question_of(payload)
                with stub.lock:
                    stub.calls.append((payload["model"], question, payload, dict(self.headers)))
                    if payload["model"] == "stub-chat":
                        action = f"answer to: {question}"
                    else:
                        replies = stub.script[question]
                        action = replies.pop(0) if len(replies) > 1 else replies[0]
                if isinstance(action, tuple) and action[0] == "status":
                    return self._send(action[1], b'{"error": {"message": "the judge broke"}}')
                if isinstance(action, tuple) and action[0] == "body":
                    return self._send(200, action[1], "text/html")
                if isinstance(action, tuple) and action[0] == "slow":
                    time.sleep(action[1])
                    action = action[2]
                reply = {"object": "chat.completion", "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": action}, "finish_reason": "stop"}]}
                self._send(200, json.dumps(reply).encode())

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def judge_calls(self, question=None):
        return [call for call in self.calls if call[0] != "stub-chat" and question in (None, call[1])]

    def model_calls(self):
        return [call for call in self.calls if call[0] == "stub-chat"]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _question_of(payload) -> str:
    content = payload["messages"][-1]["content"]
    if isinstance(content, list):  # the model's request: image, then the question
        return next(part["text"] for part in content if part["type"] == "text")
    return content.split("[Question]\n", 1)[1].split("\n\n[", 1)[0]  # the judge's prompt


@pytest.fixture
def stub():
    server = Stub(SCRIPT)
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _no_keys(monkeypatch):
    for name in ("OPENAI_API_KEY", "VISCPM_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def write_bench(root, questions=QUESTIONS, rule=None, images=("a.png", "b.png", "c.png")):
    """The LLaVA-bench files under ``root``: questions, references ("reference N"), contexts, tiny images."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    for index, name in enumerate(images):
        PIL.Image.new("RGB", (16, 12), (40 * index, 90, 200)).save(root / "images" / name)
    lines = [json.dumps({"question_id": qid, "image": image, "category": category, "text": text})
             for qid, image, category, text in questions]
    (root / "questions.jsonl").write_text("\n".join(lines) + "\n")
    (root / "answers_gpt4.jsonl").write_text("".join(
        json.dumps({"question_id": q[0], "text": f"reference {q[0]}", "model_id": "gpt-4-0314"}) + "\n"
        for q in questions))
    contexts = [{"image": image, "caption": caption} for image, caption in CAPTIONS.items()]
    contexts[2]["instances"] = [{"category": "bowl", "bbox": [0.1, 0.2, 0.5, 0.6]}]
    (root / "context.jsonl").write_text("".join(json.dumps(c) + "\n" for c in contexts))
    if rule is not None:
        (root / "rule.json").write_text(json.dumps(rule))
    return root


def _run(cli_main, tmp_path, stub, *extra, bench="bench", out="out", model=("--model-url", None)):
    flag, value = model
    return cli_main(tmp_path, "eval", "llava-bench", tmp_path / bench, "--output-dir", tmp_path / out,
                    flag, value or stub.url, "--judge-url", stub.url, "--judge-model", JUDGE, "--judge-timeout",
                    "0.4", "--retries", "1", "--retry-wait", "0", "--no-progress", *extra)


def _rows(results):
    return {category: row for category, row in results["categories"].items()}


def test_parse_scores():
    assert lb.parse_scores("8 6\nbecause") == (8.0, 6.0)
    assert lb.parse_scores("\n  7.5,9\n") == (7.5, 9.0)
    assert lb.parse_scores("**10 3**") == (10.0, 3.0)
    for garbage in ("8\nonly one", "8 6 7", "Assistant 1: 8 Assistant 2: 6", "eleven 3", "11 3", "-1 -1", "nan 3",
                    "", None, "Score: 8 6"):
        assert lb.parse_scores(garbage) is None, garbage


def test_summary_numbers_failures_and_resume(cli_main, tmp_path, stub, monkeypatch):
    """Exact per-category numbers over scored questions; an unparseable reply and three failed calls (HTTP 500, a
    timeout, a broken body, each tried twice) are counted, not averaged; a rerun asks the judge only about the
    failed ones and the model nothing; a third run asks nobody."""
    write_bench(tmp_path / "bench")
    monkeypatch.setenv("MY_JUDGE_KEY", "judge-secret")
    first = _run(cli_main, tmp_path, stub, "--judge-key-env", "MY_JUDGE_KEY")
    assert first.returncode == 1, first.stderr
    assert "3 question(s) have no score because a call failed (6, 7, 8;" in first.stderr
    assert "1 judge repl(ies) had no two scores" in first.stderr and "question(s) 4" in first.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = _rows(results)
    assert list(rows) == ["conv", "detail", "complex", "all"]
    assert rows["conv"] == {"n": 2, "n_scored": 2, "n_unparseable": 0, "n_failed": 0, "n_skipped": 0,
                            "reference_mean": 9.0, "model_mean": 6.5, "relative_score": pytest.approx(650 / 9)}
    assert rows["detail"] == {"n": 2, "n_scored": 1, "n_unparseable": 1, "n_failed": 0, "n_skipped": 0,
                              "reference_mean": 6.0, "model_mean": 3.0, "relative_score": 50.0}
    assert rows["complex"] == {"n": 4, "n_scored": 1, "n_unparseable": 0, "n_failed": 3, "n_skipped": 0,
                               "reference_mean": 7.0, "model_mean": 7.0, "relative_score": 100.0}
    assert rows["all"] == {"n": 8, "n_scored": 4, "n_unparseable": 1, "n_failed": 3, "n_skipped": 0,
                           "reference_mean": 7.75, "model_mean": 5.75, "relative_score": pytest.approx(2300 / 31)}
    assert results["unparseable_question_ids"] == [4] and results["failed_question_ids"] == [6, 7, 8]
    assert results["judge"] == JUDGE and results["model"] == "stub-chat"  # the first model the server lists
    table = first.stdout.splitlines()
    assert table[0].split() == ["category", "n", "scored", "unparseable", "failed", "skipped", "reference", "model",
                                "relative"]
    assert table[1].split() == ["conv", "2", "2", "0", "0", "0", "9.00", "6.50", "72.2"]
    assert table[4].split() == ["all", "8", "4", "1", "3", "0", "7.75", "5.75", "74.2"]

    # What the judge got: LLaVA's layout, the reference as Assistant 1, the model's answer as Assistant 2.
    assert len(stub.model_calls()) == MODEL_CALLS_PER_RUN
    assert len(stub.judge_calls()) == 5 + 3 * 2  # each failure tried 1 + --retries times
    _, _, payload, headers = stub.judge_calls("What colour is the cat?")[0]
    assert headers["Authorization"] == "Bearer judge-secret"
    assert payload["model"] == JUDGE and payload["temperature"] == 0.2 and payload["max_tokens"] == 1024
    system, user = payload["messages"]
    assert system == {"role": "system", "content": lb.JUDGE_SYSTEM_PROMPT}
    assert user["content"] == (
        "[Context]\nA black cat sits on a red sofa.\n\n[Question]\nWhat colour is the cat?\n\n"
        "[Assistant 1]\nreference 1\n\n[End of Assistant 1]\n\n"
        "[Assistant 2]\nanswer to: What colour is the cat?\n\n[End of Assistant 2]\n\n"
        f"[System]\n{lb.DEFAULT_RULE['prompt']}\n\n")
    bowl = stub.judge_calls("Why are there chopsticks?")[0][2]["messages"][1]["content"]
    assert bowl.startswith('[Context]\nA bowl of noodles with chopsticks.\n\nbowl: [0.1, 0.2, 0.5, 0.6]\n\n[Question]')
    beach = stub.judge_calls("Describe the sea.")[0][2]["messages"][1]["content"]
    assert beach.startswith("[Context]\nTwo dogs run on a beach.\nThe sea is calm.\n\n[Question]")
    model_request = stub.model_calls()[0][2]
    assert model_request["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert "max_tokens" not in model_request  # the server's own decoding, as published

    # Rerun: only the three failed questions go to the judge again (now it answers); nothing to the model.
    for question, replies in FIXED.items():
        stub.script[question] = list(replies)
    before = len(stub.calls)
    second = _run(cli_main, tmp_path, stub, "--judge-key-env", "MY_JUDGE_KEY")
    assert second.returncode == 0, second.stderr
    new = stub.calls[before:]
    assert sorted(call[1] for call in new) == sorted(FIXED)
    rows = _rows(json.loads((tmp_path / "out" / "results.json").read_text()))
    assert rows["complex"]["n_scored"] == 4 and rows["complex"]["n_failed"] == 0
    assert rows["complex"]["reference_mean"] == (7 + 5 + 6 + 8) / 4 and rows["complex"]["model_mean"] == 4.0
    model, reference = 6 + 7 + 3 + 7 + 4 + 3 + 2, 8 + 10 + 6 + 7 + 5 + 6 + 8
    assert rows["all"]["relative_score"] == pytest.approx(100 * model / reference)
    assert rows["detail"]["n_unparseable"] == 1  # an unparseable reply is a reply: kept, not asked again

    before = len(stub.calls)
    third = _run(cli_main, tmp_path, stub, "--judge-key-env", "MY_JUDGE_KEY")
    assert third.returncode == 0 and stub.calls[before:] == []
    assert third.stdout == second.stdout


def test_interrupted_run_resumes(tmp_path, stub):
    """A run killed mid-way (Ctrl-C in the judge, a line cut short in each cache) continues: the answers and reviews
    that are complete are reused, the cut lines are dropped and redone, and the files stay clean JSON lines."""
    questions = [q for q in QUESTIONS if not q[3].startswith("Q")]
    bench = lb.load_bench(write_bench(tmp_path / "bench", questions))
    out = tmp_path / "out"
    answerer = lb.chat_endpoint_answerer(stub.url, "stub-chat")
    judge = lb.chat_endpoint_judge(stub.url, JUDGE)
    calls = []

    def interrupted_judge(messages):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(messages)
        return judge(messages)

    with pytest.raises(KeyboardInterrupt):
        lb.run_llava_bench(bench, out, answerer, "stub-chat", interrupted_judge, JUDGE, concurrency=1,
                           progress=False)
    assert len(lb.load_records(out / lb.REVIEWS_FILE)) == 2
    assert len(lb.load_records(out / lb.ANSWERS_FILE)) == len(questions)
    # The kill also cut the last line of each file in the middle.
    answers = (out / lb.ANSWERS_FILE).read_text().splitlines(keepends=True)
    (out / lb.ANSWERS_FILE).write_text("".join(answers[:3]) + answers[3][:20])
    with open(out / lb.REVIEWS_FILE, "a") as handle:
        handle.write('{"question_id": 3, "status": "o')

    stub.calls.clear()
    results = lb.run_llava_bench(bench, out, answerer, "stub-chat", judge, JUDGE, progress=False)
    assert [call[1] for call in stub.model_calls()] == [questions[3][3], questions[4][3]]  # the cut one, the last
    judged = sorted(call[1] for call in stub.judge_calls())
    assert judged == sorted(q[3] for q in questions[2:])  # not the two reviewed before the interrupt
    for name in (lb.ANSWERS_FILE, lb.REVIEWS_FILE):
        lines = (out / name).read_text().splitlines()
        assert all(json.loads(line) for line in lines)
    assert results["categories"]["all"]["n_scored"] == 4 and results["categories"]["all"]["n_unparseable"] == 1
    assert results["failed_question_ids"] == []

    # Answers regenerated (another file) are judged again; the others are not.
    records = (out / lb.ANSWERS_FILE).read_text().splitlines()
    changed = json.loads(records[0])
    changed["text"] = "a different answer"
    (out / lb.ANSWERS_FILE).write_text("\n".join([json.dumps(changed), *records[1:]]) + "\n")
    stub.calls.clear()
    lb.run_llava_bench(bench, out, answerer, "stub-chat", judge, JUDGE, progress=False)
    assert [call[1] for call in stub.calls] == [questions[0][3]]
    # Another judge or model in the same folder is refused, not mixed in.
    with pytest.raises(lb.BenchError, match="holds reviews by judge 'judge-1', not 'judge-2'"):
        lb.run_llava_bench(bench, out, answerer, "stub-chat", judge, "judge-2", progress=False)
    with pytest.raises(lb.BenchError, match="holds answers of model 'stub-chat', not 'other'"):
        lb.run_llava_bench(bench, out, answerer, "other", judge, JUDGE, progress=False)


def test_judge_down_stops_the_run(tmp_path, stub):
    """A judge (or model server) failing question after question stops the run after 5 in a row instead of waiting
    out every question; what was done is in the cache, and the next run asks only about the rest."""
    bench = lb.load_bench(write_bench(tmp_path / "bench", QUESTIONS[:7]))
    answerer = lb.chat_endpoint_answerer(stub.url, "stub-chat")
    calls = []

    def down(messages):
        calls.append(messages)
        if len(calls) > 1:
            raise lb.EndpointError("HTTP 503 from the judge")
        return "9 8"

    with pytest.raises(lb.EndpointError, match="the judge failed 5 questions in a row .last: HTTP 503"):
        lb.run_llava_bench(bench, tmp_path / "out", answerer, "stub-chat", down, JUDGE, concurrency=1, retries=0,
                           progress=False)
    statuses = [record["status"] for record in lb.load_records(tmp_path / "out" / lb.REVIEWS_FILE).values()]
    assert statuses == ["ok"] + ["failed"] * 5
    assert 6 <= len(calls) <= 7  # the worker may have started the next question, whose result is dropped
    def model_down(question, image):
        raise lb.EndpointError("cannot reach the model")

    with pytest.raises(lb.EndpointError, match="the model failed 5 questions in a row .last: cannot reach"):
        lb.run_llava_bench(bench, tmp_path / "other", model_down, "stub-chat", down, JUDGE, retries=0,
                           progress=False)
    results = lb.run_llava_bench(bench, tmp_path / "out", answerer, "stub-chat", lambda messages: "4 2", JUDGE,
                                 progress=False)
    assert results["categories"]["all"] == {"n": 7, "n_scored": 7, "n_unparseable": 0, "n_failed": 0, "n_skipped": 0,
                                            "reference_mean": pytest.approx(33 / 7),
                                            "model_mean": pytest.approx(20 / 7),
                                            "relative_score": pytest.approx(100 * 20 / 33)}


def test_rule_file_and_categories(tmp_path, stub):
    """rule.json's per-category rules (LLaVA's llava_bench_<category> keys, its role name) reach the judge; a
    category without a rule is an error naming it."""
    questions = QUESTIONS[:3]
    rule = {"llava_bench_conv": {"role": "Helper", "prompt": "CONV RULE"}, "detail": {"prompt": "DETAIL RULE"}}
    bench = lb.load_bench(write_bench(tmp_path / "bench", questions, rule=rule))
    lb.run_llava_bench(bench, tmp_path / "out", lb.chat_endpoint_answerer(stub.url, "stub-chat"), "stub-chat",
                       lb.chat_endpoint_judge(stub.url, JUDGE), JUDGE)  # with progress bars
    conv = stub.judge_calls(questions[0][3])[0][2]["messages"][1]["content"]
    assert "[Helper 1]\nreference 1\n\n[End of Helper 1]\n\n[Helper 2]\n" in conv and conv.endswith(
        "[System]\nCONV RULE\n\n")
    detail = stub.judge_calls(questions[2][3])[0][2]["messages"][1]["content"]
    assert "[Assistant 1]" in detail and detail.endswith("[System]\nDETAIL RULE\n\n")
    (tmp_path / "bench" / "rule.json").write_text(json.dumps({"llava_bench_conv": rule["llava_bench_conv"]}))
    with pytest.raises(lb.BenchError, match=r"rule.json has no rule for category 'detail'"):
        lb.load_bench(tmp_path / "bench")


def test_bad_inputs(cli_main, tmp_path, stub):
    """Each bad input stops the run before any call with one line naming the file (and line): a bad JSON line, a
    missing field, a duplicate id, a missing reference or context, a missing image (or, with --skip-missing-images,
    a counted skip); a judge that refuses the key stops the run too, keeping the answers."""
    root = write_bench(tmp_path / "bench", QUESTIONS[:3])
    questions = (root / "questions.jsonl").read_text()

    def error_of(text, *extra):
        (root / "questions.jsonl").write_text(text)
        result = _run(cli_main, tmp_path, stub, *extra)
        (root / "questions.jsonl").write_text(questions)
        assert result.returncode == 1 and result.stdout == ""
        return result.stderr.strip()

    lines = questions.splitlines()
    path = root / "questions.jsonl"
    assert error_of("\n".join([lines[0], "{not json", lines[2]])) == \
        f"error: {path}:2: not valid JSON (Expecting property name enclosed in double quotes, column 2)"
    assert error_of("\n".join([lines[0], '{"question_id": 9, "image": "a.png", "text": "q"}'])) == \
        f"error: {path}:2: no 'category' field"
    assert error_of("\n".join([lines[0], lines[0]])) == f"error: {path}:2: question_id 1 is also on line 1"
    assert error_of(questions + json.dumps({"question_id": 99, "image": "a.png", "category": "conv", "text": "x"})) \
        == f"error: {root / 'answers_gpt4.jsonl'} has no reference answer for question 99 ({path}:4)"
    assert error_of(questions + json.dumps({"question_id": 1.5, "image": "a.png", "category": "c", "text": "x"})) \
        == f"error: {path}:4: 'question_id' must be a int or str, got float"
    assert stub.calls == []

    (root / "images" / "b.png").unlink()
    missing = _run(cli_main, tmp_path, stub)
    assert missing.returncode == 1 and stub.calls == []
    assert missing.stderr.strip() == (f"error: image not found: {root / 'images' / 'b.png'} ({path}:3); add the "
                                      "image(s), or pass --skip-missing-images to count those questions as skipped")
    skipped = _run(cli_main, tmp_path, stub, "--skip-missing-images")
    assert skipped.returncode == 0, skipped.stderr
    assert "1 question(s) skipped for a missing image: 3" in skipped.stderr
    rows = _rows(json.loads((tmp_path / "out" / "results.json").read_text()))
    assert rows["detail"] == {"n": 1, "n_scored": 0, "n_unparseable": 0, "n_failed": 0, "n_skipped": 1,
                              "reference_mean": None, "model_mean": None, "relative_score": None}
    assert rows["all"]["n_skipped"] == 1 and rows["all"]["n_scored"] == 2
    assert len(stub.model_calls()) == 2

    # A judge that refuses the key: one line, exit 1, and the answers so far are kept for the next run.
    refusing = Stub({q[3]: [("status", 401)] for q in QUESTIONS})
    try:
        result = cli_main(tmp_path, "eval", "llava-bench", root, "--output-dir", tmp_path / "out401", "--model-url",
                          stub.url, "--judge-url", refusing.url, "--judge-model", JUDGE, "--no-progress",
                          "--skip-missing-images", "--judge-concurrency", "1")
        assert result.returncode == 1
        assert result.stderr.startswith(f"error: HTTP 401 from {refusing.url}/chat/completions: the judge broke "
                                        "(check the API key)")
        assert len(refusing.judge_calls()) == 1  # not retried, not asked about the other question
        assert len(lb.load_records(tmp_path / "out401" / lb.ANSWERS_FILE)) == 2
    finally:
        refusing.close()
    unset = _run(cli_main, tmp_path, stub, "--judge-key-env", "NO_SUCH_VARIABLE_SET")
    assert unset.returncode == 2 and "the environment variable NO_SUCH_VARIABLE_SET is not set" in unset.stderr


def test_answers_from_viscpm_api_and_local_model(cli_main, tmp_path, stub, tiny_models, monkeypatch):
    """The model's answers from `viscpm api` serving a tiny VisCPM-Chat (a subprocess, as a user runs it) are the
    answers of the same folder loaded here with --model: both are `VisCPMChat.chat`'s beam search."""
    from live_server import free_port, start, stop

    chat_dir, _ = tiny_models
    write_bench(tmp_path / "bench", QUESTIONS[:3])
    port = free_port()
    server = start(["api", str(chat_dir), "--port", str(port), "--device", "cpu", "--max-tokens", "8"],
                   f"http://127.0.0.1:{port}/health", tmp_path / "api.log", tmp_path, env={"VISCPM_API_KEY": "k1"})
    monkeypatch.setenv("API_KEY_FOR_TEST", "k1")
    try:
        via_api = cli_main(tmp_path, "eval", "llava-bench", tmp_path / "bench", "--output-dir", tmp_path / "api",
                           "--model-url", f"http://127.0.0.1:{port}/v1", "--model-key-env", "API_KEY_FOR_TEST",
                           "--max-new-tokens", "4", "--judge-url", stub.url, "--judge-model", JUDGE,
                           "--no-progress")
    finally:
        stop(server)
    assert via_api.returncode == 0, via_api.stderr
    local = cli_main(tmp_path, "eval", "llava-bench", tmp_path / "bench", "--output-dir", tmp_path / "local",
                     "--model", chat_dir, "--device", "cpu", "--max-new-tokens", "4", "--judge-url", stub.url,
                     "--judge-model", JUDGE, "--no-progress")
    assert local.returncode == 0, local.stderr
    api_answers = lb.load_records(tmp_path / "api" / lb.ANSWERS_FILE)
    local_answers = lb.load_records(tmp_path / "local" / lb.ANSWERS_FILE)
    assert {record["model_id"] for record in api_answers.values()} == {chat_dir.name}
    assert [r["text"] for r in api_answers.values()] == [r["text"] for r in local_answers.values()]
    assert all(r["text"].strip() for r in api_answers.values())
    judged = [call[2]["messages"][1]["content"] for call in stub.judge_calls(QUESTIONS[0][3])]
    assert len(judged) == 2 and f"[Assistant 2]\n{api_answers['1']['text']}\n\n[End of Assistant 2]" in judged[0]
    assert json.loads((tmp_path / "local" / "results.json").read_text())["categories"]["conv"]["n_scored"] == 2
