"""``viscpm eval``: benchmarks, one sub-command each (``llava-bench`` so far).

    viscpm eval llava-bench BENCH_DIR --output-dir OUT --judge-url URL --judge-model NAME \\
        (--model CHAT_DIR | --model-url URL)

The library part is `viscpm.evaluation`; this module only wires it to the command line. A new benchmark adds a
``_<name>_parser`` and registers it in `add_eval_parser`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from viscpm.conversion.common import ScriptArgumentParser

from . import eval_fid
from .common import EXIT_ERROR, EXIT_OK, EXIT_USAGE, AppError

__all__ = ["add_eval_parser", "cmd_llava_bench"]


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be above 0, got {text!r}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be from 0 to 3600 seconds, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text!r}")
    return value


def _key(variable: str | None, default: str, option: str) -> str | None:
    """The API key from the environment variable ``variable`` (``default`` when not given). A variable named on
    the command line must be set; the default one may be unset (a local endpoint without a key)."""
    name = variable or default
    key = os.environ.get(name) or None
    if key is None and variable is not None:
        raise AppError(f"{option} {variable}: the environment variable {variable} is not set", EXIT_USAGE)
    return key


def cmd_llava_bench(args) -> int:
    from viscpm.evaluation import llava_bench as lb

    if args.bench is None and None in (args.questions, args.references, args.context, args.images):
        raise AppError("give the bench folder (BENCH_DIR), or all of --questions, --references, --context and "
                       "--images", EXIT_USAGE)
    judge_key = _key(args.judge_key_env, "OPENAI_API_KEY", "--judge-key-env")
    try:
        bench = lb.load_bench(args.bench, questions=args.questions, references=args.references,
                              context=args.context, images=args.images, rules=args.rules)
        if args.model_url is not None:
            model_key = _key(args.model_key_env, "VISCPM_API_KEY", "--model-key-env")
            model_id = args.model_name or _first_model(lb, args.model_url, model_key)
            answerer = lb.chat_endpoint_answerer(args.model_url, model_id, model_key, timeout=args.model_timeout,
                                                 max_tokens=args.max_new_tokens)
        else:
            lb.check_images(bench, args.skip_missing_images)  # a missing image: the error before the model loads
            from .common import load_chat

            chat = load_chat(args.model, args.dtype, args.device, args.variant, args.adapter)
            model_id = args.model_name or Path(args.model).name or args.model
            overrides = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
            answerer = lb.local_chat_answerer(chat, **overrides)
        judge = lb.chat_endpoint_judge(args.judge_url, args.judge_model, judge_key, timeout=args.judge_timeout,
                                       temperature=args.judge_temperature, max_tokens=args.judge_max_tokens)
        results = lb.run_llava_bench(
            bench, args.output_dir, answerer, model_id, judge, args.judge_model,
            skip_missing_images=args.skip_missing_images, concurrency=args.judge_concurrency, retries=args.retries,
            retry_wait=args.retry_wait, progress=not args.no_progress,
            extra_results={"judge_url": args.judge_url, "model_source": args.model_url or args.model})
    except (lb.BenchError, lb.EndpointError) as error:
        raise AppError(str(error)) from None
    print(lb.format_table(results))
    print(f"results: {Path(args.output_dir) / lb.RESULTS_FILE}")
    if results["unparseable_question_ids"]:
        print(f"note: {len(results['unparseable_question_ids'])} judge repl(ies) had no two scores on the first "
              f"line and are left out of the means: question(s) {_ids(results['unparseable_question_ids'])}",
              file=sys.stderr)
    if results["skipped_question_ids"]:
        print(f"note: {len(results['skipped_question_ids'])} question(s) skipped for a missing image: "
              f"{_ids(results['skipped_question_ids'])}", file=sys.stderr)
    failed = results["failed_question_ids"]
    if failed:
        print(f"error: {len(failed)} question(s) have no score because a call failed ({_ids(failed)}; see "
              f"{lb.REVIEWS_FILE}); run the same command again to retry them", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _ids(ids: list) -> str:
    return ", ".join(map(str, ids[:10])) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")


def _first_model(lb, url: str, key: str | None) -> str:
    models = lb.list_models(url, key)
    if not models:
        raise AppError(f"{url} lists no models; pass --model-name")
    return models[0]


def _llava_bench_parser(benches, parents) -> argparse.ArgumentParser:
    bench = benches.add_parser(
        "llava-bench", parents=parents, help="LLaVA-bench: a judge model (e.g. GPT-4) scores the answers",
        description="Answer the LLaVA-bench questions with VisCPM-Chat (a local folder, or an OpenAI-compatible "
                    "server such as `viscpm api`), have an OpenAI-compatible judge score each answer against the "
                    "reference answer (LLaVA's protocol), and print the relative score per category. Answers and "
                    "reviews are cached in --output-dir: a rerun continues where the last one stopped.",
        epilog="Exit status 1 when some question has no score because a call failed (the results are written all "
               "the same; run again to retry them).")
    bench.add_argument("bench", metavar="BENCH_DIR", nargs="?",
                       help="folder with questions.jsonl, answers_gpt4.jsonl, context.jsonl, images/ and optionally "
                            "rule.json (LLaVA-bench's layout)")
    files = bench.add_argument_group("bench files (each replaces the one in BENCH_DIR)")
    files.add_argument("--questions", help="questions JSONL: question_id, image, text, category")
    files.add_argument("--references", help="reference answers JSONL (GPT-4's): question_id, text")
    files.add_argument("--context", help="image contexts JSONL: image, caption (and optional instances)")
    files.add_argument("--images", help="the image folder")
    files.add_argument("--rules", help="judge rules JSON by category (default: BENCH_DIR/rule.json if present, else "
                                       "the built-in LLaVA-bench rule)")
    bench.add_argument("--output-dir", required=True, help="where answers.jsonl, reviews.jsonl and results.json go; "
                                                           "the cache a rerun resumes from")
    model = bench.add_argument_group("the model answering")
    source = model.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a converted VisCPM-Chat folder (or Hub repo id), run here")
    source.add_argument("--model-url", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (viscpm api)")
    model.add_argument("--model-name", help="model id: the server's model (default: the first it lists); the label "
                                            "of a local model (default: the folder name)")
    model.add_argument("--model-key-env", metavar="NAME", help="environment variable with the server's API key "
                                                               "(default: VISCPM_API_KEY, if set)")
    model.add_argument("--model-timeout", type=_positive(float), default=600.0,
                       help="seconds to wait for one answer (default: %(default)s)")
    model.add_argument("--variant", help="--model: which weights to load (e.g. v1.1, balance, zhplus)")
    model.add_argument("--adapter", help="--model: a PEFT language adapter to load on top")
    model.add_argument("--max-new-tokens", type=_positive(int),
                       help="longest answer (default: the model's own setting, as in the published figures)")
    judge = bench.add_argument_group("the judge")
    judge.add_argument("--judge-url", required=True, help="OpenAI-compatible base URL, e.g. "
                                                          "https://api.openai.com/v1")
    judge.add_argument("--judge-model", required=True, help="e.g. gpt-4-0314 (LLaVA's) or another model")
    judge.add_argument("--judge-key-env", metavar="NAME", help="environment variable with the judge's API key "
                                                               "(default: OPENAI_API_KEY, if set)")
    judge.add_argument("--judge-timeout", type=_positive(float), default=120.0,
                       help="seconds to wait for one reply (default: %(default)s)")
    judge.add_argument("--judge-concurrency", type=_positive(int), default=4,
                       help="judge requests at once (default: %(default)s)")
    judge.add_argument("--judge-temperature", type=float, default=0.2, help="default: %(default)s (LLaVA's)")
    judge.add_argument("--judge-max-tokens", type=_positive(int), default=1024, help="default: %(default)s")
    bench.add_argument("--retries", type=_count, default=2,
                       help="extra tries of a call that timed out or failed, before the question counts as failed "
                            "(default: %(default)s)")
    bench.add_argument("--retry-wait", type=_seconds, default=2.0,
                       help="seconds before the first retry, doubling after (default: %(default)s)")
    bench.add_argument("--skip-missing-images", action="store_true",
                       help="count questions whose image is missing as skipped instead of stopping")
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench.set_defaults(func=cmd_llava_bench)
    return bench


def add_eval_parser(commands, parents) -> argparse.ArgumentParser:
    """Register ``viscpm eval`` and its benchmarks; ``parents`` are the command line's (``--debug``, then
    ``--dtype``/``--device``)."""
    evaluate = commands.add_parser("eval", parents=parents[:1], help="run a benchmark (llava-bench, fid)",
                                   description="Evaluate VisCPM on a benchmark. `viscpm eval BENCHMARK --help` lists "
                                               "each one's options.")
    benches = evaluate.add_subparsers(dest="benchmark", metavar="BENCHMARK", parser_class=ScriptArgumentParser)
    benches.required = True
    _llava_bench_parser(benches, parents)
    fid = benches.add_parser("fid", parents=parents[:1], help="FID (and CLIP score) of generated images",
                             description=eval_fid.DESCRIPTION)
    eval_fid.add_arguments(fid).set_defaults(func=eval_fid.run)
    return evaluate
