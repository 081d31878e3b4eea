#!/usr/bin/env python
"""Upload a converted VisCPM folder (Chat, Paint, CPM-Bee) or a language adapter to the Hugging Face Hub.

    python conversion/push_to_hub.py viscpm-chat-hf me/viscpm-chat-hf \\
        [--private] [--revision BRANCH] [--commit-message MSG] [--create-pr] \\
        [--source-checkpoint viscpm_chat_balance_checkpoint.pt] [--language zh --language en] \\
        [--dry-run | --stage-dir DIR [--overwrite]]

The repo gets the folder's files, the model-definition files from `modeling/` with `auto_map` entries (so it loads
with `trust_remote_code=True` where viscpm is not installed) and a generated model card (YAML metadata, what the
model is, usage for this repo, the source checkpoint and its sha256). Everything goes up in one commit, with the
token from `HF_TOKEN` or the login cache (`hf auth login`).

`--dry-run` prints the file list and the card without touching the network; `--stage-dir DIR` writes the exact
folder that would be uploaded and uploads nothing.

Exit status: 0 on success, 1 on an error (one line on stderr), 2 on a usage error.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    try:
        from viscpm.hub import cli_main
    except ImportError as error:
        print(f"error: cannot import viscpm ({error}); run `pip install -e .` in the repository", file=sys.stderr)
        return 1
    return cli_main(argv, prog="push_to_hub.py")


if __name__ == "__main__":
    sys.exit(main())
