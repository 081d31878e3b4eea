"""Original checkpoints to Hugging Face folders, original-format loading, and the Hub push.

Installed as ``viscpm.conversion``; each ``convert_*.py`` and ``push_to_hub.py`` is also a script
(``python conversion/convert_viscpm_chat.py --help``, ``python -m viscpm.conversion.convert_viscpm_chat``,
``viscpm convert chat``):

* ``common.py``: what every converter shares (safe memory-mapped loading, key maps, validation, sharded
  safetensors written atomically, the scripts' error handling);
* ``convert_cpmbee.py``, ``convert_viscpm_chat.py``, ``convert_viscpm_paint.py``: one model each, with the
  original->HF key and config tables;
* ``original_format.py``: ``from_pretrained`` on the openbmb repos and original ``.pt`` files (fetch, convert
  once into a cache);
* ``push_to_hub.py``: staging and uploading a converted folder or adapter with its model card and remote code.
"""
