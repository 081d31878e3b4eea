#!/usr/bin/env python
"""`viscpm api` throughput: requests/s and tokens/s at 1, 4, 8 and 16 concurrent clients, batching on and off.

A medium random VisCPM-Chat (BEiT-3 384x6 at 224 px, CPM-Bee 512x8, 64 image queries: the config of
`bench_chat.py`) is written in the original checkpoint format and converted with the real converter, then served
by the real command twice at once, in subprocesses on 127.0.0.1: one batching (``--max-batch-size 16``), one
serving one request at a time (``--max-batch-size 1``). Each level of clients runs ``--repeats`` times against each
server in alternating order and the best run counts, so that other work on the machine weighs on both alike.
Each of C clients (threads with the `openai` client) sends ``--requests`` questions one after the other, each about
its own image (a new random 224x224 PNG per request, so the vision cache does not help); the table gives completed
requests and generated tokens (``usage.completion_tokens``) per second of wall time, and whether the two servers
gave the same answers to the same requests (they must: batching does not change an answer). A measurement
script, not a test: nothing asserts on timing.

    python benchmarks/bench_api.py [--decoding beam|greedy] [--max-tokens 32] [--requests 2] [--repeats 2]
"""

import argparse
import base64
import concurrent.futures
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "apps"))

VISION = dict(encoder_embed_dim=384, encoder_layers=6, encoder_attention_heads=6, encoder_ffn_embed_dim=1536,
              img_size=224, patch_size=16, vocab_size=100)
LLM = dict(dim_model=512, num_heads=8, dim_head=64, dim_ff=1280, num_layers=8, position_bias_num_buckets=256,
           position_bias_num_segment_buckets=256, position_bias_max_distance=2048)
QUERY_NUM = 64
CLIENTS = (1, 4, 8, 16)
QUESTIONS = ("这张图片里有什么？", "What is in the picture?", "Describe the colours.", "图里有几个物体？")


def build_model(folder: str) -> str:
    from viscpm.apps.demo import build_tiny_chat_checkpoint, find_vocab
    from viscpm.conversion.convert_viscpm_chat import convert_viscpm_chat_checkpoint
    from viscpm.modeling import CpmBeeTokenizer

    vocab = find_vocab(None)
    original = Path(folder) / "original"
    original.mkdir()
    files = build_tiny_chat_checkpoint(original, CpmBeeTokenizer(vocab).vocab_size,
                                       llm_overrides=LLM, vision_overrides=VISION, query_num=QUERY_NUM)
    output = os.path.join(folder, "viscpm-chat-medium")
    convert_viscpm_chat_checkpoint(files["checkpoint"], output, llm_config=files["llm_config"],
                                   vision_config=files["vision_config"], query_num=QUERY_NUM, vocab_file=vocab,
                                   progress=False)
    return output


def image_url(seed: int) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def run_clients(base: str, clients: int, requests: int, args, offset: int) -> tuple[float, int, dict]:
    """C clients, each sending `requests` questions in turn; returns (seconds, tokens, {request id: answer})."""
    from openai import OpenAI

    client = OpenAI(base_url=base + "/v1", api_key="bench", max_retries=0, timeout=600)
    extra = {"temperature": 0} if args.decoding == "greedy" else {}
    jobs = [(offset + c * requests + r) for c in range(clients) for r in range(requests)]
    urls = {job: image_url(job) for job in jobs}

    def client_loop(c):
        tokens, answers = 0, {}
        for r in range(requests):
            job = offset + c * requests + r
            message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": urls[job]}},
                                                   {"type": "text", "text": QUESTIONS[job % len(QUESTIONS)]}]}
            reply = client.chat.completions.create(model="viscpm-chat-medium", messages=[message],
                                                   max_tokens=args.max_tokens, **extra)
            tokens += reply.usage.completion_tokens
            answers[job] = reply.choices[0].message.content
        return tokens, answers

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client_loop, range(clients)))
    seconds = time.perf_counter() - start
    return seconds, sum(t for t, _ in results), {k: v for _, answers in results for k, v in answers.items()}


def measure(bases: dict, clients: int, args) -> dict:
    """One level of clients against each server, ``--repeats`` times in alternating order; the best run of each."""
    import httpx

    best, first_answers = {}, {}
    for repeat in range(args.repeats):
        for name in (list(bases) if repeat % 2 == 0 else list(bases)[::-1]):
            before = httpx.get(bases[name] + "/health").json()
            seconds, tokens, answers = run_clients(bases[name], clients, args.requests, args,
                                                   offset=clients * 1000 + repeat * 100)
            batches = httpx.get(bases[name] + "/health").json()["batches"] - before["batches"]
            count = clients * args.requests
            print(f"  {name:>13}, {clients:2d} clients: {count / seconds:6.2f} req/s {tokens / seconds:7.1f} tok/s "
                  f"({count} requests, {tokens} tokens, {seconds:.1f} s, {count / max(batches, 1):.1f} requests "
                  "per batch)", flush=True)
            first_answers.setdefault(name, answers)
            if name not in best or seconds < best[name]["seconds"]:
                best[name] = dict(seconds=seconds, requests=count, tokens=tokens, mean_batch=count / max(batches, 1))
    best["same answers"] = first_answers["batched"] == first_answers["one at a time"]
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decoding", choices=["beam", "greedy"], default="beam",
                        help="beam: the default (chat()'s original beam search, 3 beams); greedy: temperature=0")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each level per server (the best counts)")
    parser.add_argument("--batch-wait-ms", type=float, default=50.0, help="the server's (default: its default)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from live_server import free_port, start, stop

    with tempfile.TemporaryDirectory() as tmp:
        print("building and converting the medium random model ...", flush=True)
        model = build_model(tmp)
        bases, processes = {}, []
        try:
            for name, batch in (("batched", 16), ("one at a time", 1)):
                port = free_port()
                bases[name] = f"http://127.0.0.1:{port}"
                processes.append(start(
                    ["api", model, "--port", str(port), "--device", "cpu", "--max-batch-size", str(batch),
                     "--batch-wait-ms", str(args.batch_wait_ms), "--max-tokens", str(args.max_tokens)],
                    bases[name] + "/health", os.path.join(tmp, f"server-{batch}.log"), tmp))
                run_clients(bases[name], 1, 1, args, offset=10_000)  # warm-up
            results = {clients: measure(bases, clients, args) for clients in CLIENTS}
        finally:
            for process in processes:
                stop(process)

    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, fp32; decoding {args.decoding}, max_tokens {args.max_tokens}, "
          f"{args.requests} requests per client, best of {args.repeats}, --batch-wait-ms {args.batch_wait_ms:g}\n")
    print("| clients | one at a time: req/s | tok/s | batched (max 16): req/s | tok/s | requests per batch "
          "| speed-up | answers |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for clients in CLIENTS:
        a, b = results[clients]["one at a time"], results[clients]["batched"]
        same = "same" if results[clients]["same answers"] else "DIFFERENT"
        speedup = (b["requests"] / b["seconds"]) / (a["requests"] / a["seconds"])
        print(f"| {clients} | {a['requests'] / a['seconds']:.2f} | {a['tokens'] / a['seconds']:.1f} "
              f"| {b['requests'] / b['seconds']:.2f} | {b['tokens'] / b['seconds']:.1f} | {b['mean_batch']:.1f} "
              f"| {speedup:.2f}x | {same} |")


if __name__ == "__main__":
    main()
