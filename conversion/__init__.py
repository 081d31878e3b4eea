"""Command-line scripts: original checkpoints to Hugging Face folders, and the Hub upload.

Installed as ``viscpm.conversion`` (so ``viscpm convert`` and ``viscpm push`` work from an installed package);
each script also runs on its own from a clone: ``python conversion/convert_viscpm_chat.py --help``.
"""
