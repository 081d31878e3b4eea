"""Evaluation of VisCPM models against published benchmarks.

`viscpm.evaluation.llava_bench`: LLaVA-bench, where a judge model (GPT-4, or any OpenAI-compatible endpoint) scores
the model's answers against reference answers. The command line is ``viscpm eval llava-bench``.

Nothing here imports torch or transformers; only answering with a local model does, when asked for.
"""

from .llava_bench import (
    BenchError,
    EndpointError,
    LlavaBench,
    Question,
    build_judge_messages,
    chat_endpoint_answerer,
    chat_endpoint_judge,
    check_images,
    format_table,
    judge_answers,
    load_bench,
    local_chat_answerer,
    parse_scores,
    post_chat_completion,
    run_llava_bench,
    summarize,
    write_answers,
)

__all__ = [
    "BenchError",
    "EndpointError",
    "LlavaBench",
    "Question",
    "build_judge_messages",
    "chat_endpoint_answerer",
    "chat_endpoint_judge",
    "check_images",
    "format_table",
    "judge_answers",
    "load_bench",
    "local_chat_answerer",
    "parse_scores",
    "post_chat_completion",
    "run_llava_bench",
    "summarize",
    "write_answers",
]
