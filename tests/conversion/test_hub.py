"""Hub integration: staging for remote code, the push script, and one-line loading of original checkpoints.

* A tiny converted Chat folder (the `chat` fixture) and Paint folder are staged by `conversion/push_to_hub.py
  --stage-dir`, then loaded in a fresh Python where `viscpm` cannot be imported (``-I -S`` with only
  site-packages on the path, which leaves out the editable install's finder) with ``trust_remote_code=True``;
  model logits, generated ids, processor outputs, pipeline answers and Paint images equal the installed package's.
* The push script runs against a fake `HfApi` that records the commit.
* Original-format loading runs on a fake local Hub cache (``local_files_only=True``) holding tiny original
  checkpoints under the official file names.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import CHAT_QUERY_NUM, load_script
from fake_hub_api import calls as _calls
from fake_hub_api import fake_api  # noqa: F401  (a fixture)
from PIL import Image

import viscpm  # noqa: F401  (registers the Auto classes)
import viscpm.conversion.original_format as original_format
import viscpm.conversion.push_to_hub as hub
from viscpm import VisCPMChat, VisCPMPaint, VisCPMPaintPipeline
from viscpm.conversion.common import ConversionError
from viscpm.conversion.original_format import resolve_original_format

REPO_ROOT = Path(__file__).resolve().parents[2]
# This environment's site-packages, and those a `.pth` file chains in (a venv built on another venv's packages);
# `-S` would skip the `.pth` files, so the isolated interpreter gets the folders themselves.
SITE_PACKAGES = list(dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                                    *(path for path in sys.path if Path(path).name == "site-packages")]))
QUESTION = "这张图片里有什么？"
PROMPT, NEGATIVE = "一只可爱的橘猫坐在窗台上", "模糊"
MAX_NEW_TOKENS = 6
PAINT_STEPS, PAINT_SIZE = 4, 16
GUARD_EXIT = 3

push_main = load_script("push_to_hub").main


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def paint_files(tmp_path_factory, vocab_file):
    """A tiny original VisCPM-Paint checkpoint, its configs and its converted folder (as tests/test_paint.py)."""
    from diffusers import DDPMScheduler
    from conftest import tiny_unet, tiny_vae, write_sd_base
    from originals import TINY_ORIGINAL_CONFIG, paint_checkpoint

    from viscpm.conversion.convert_viscpm_paint import convert_viscpm_paint_checkpoint

    root = tmp_path_factory.mktemp("hub-paint")
    unet, vae = tiny_unet(), tiny_vae()
    sd_base = write_sd_base(root / "sd-base", unet, vae)
    scheduler = DDPMScheduler.from_pretrained(sd_base, subfolder="scheduler")
    _, state = paint_checkpoint(unet, vae, scheduler, seed=0)
    checkpoint = root / "viscpm_paint.pt"
    torch.save(state, checkpoint)
    (root / "llm.json").write_text(json.dumps(TINY_ORIGINAL_CONFIG))
    convert_viscpm_paint_checkpoint(checkpoint, root / "hf", llm_config=root / "llm.json", sd_base=sd_base,
                                    vocab_file=vocab_file, progress=False)
    return SimpleNamespace(root=root, checkpoint=checkpoint, llm=root / "llm.json", sd_base=sd_base,
                           folder=root / "hf")


@pytest.fixture(scope="module")
def chat_info(chat, chat_files):
    _, root, checkpoint = chat_files
    return SimpleNamespace(folder=chat[3], checkpoint=checkpoint, llm=root / "llm.json", vision=root / "vision.json")


@pytest.fixture(scope="module")
def staged(chat_info, paint_files, tmp_path_factory):
    """Both folders staged by the push script, exactly as they would be uploaded."""
    root = tmp_path_factory.mktemp("staged")
    assert push_main([str(chat_info.folder), "me/viscpm-chat-tiny", "--stage-dir", str(root / "chat"),
                      "--source-checkpoint", str(chat_info.checkpoint)]) == 0
    assert push_main([str(paint_files.folder), "me/viscpm-paint-tiny", "--stage-dir", str(root / "paint")]) == 0
    return SimpleNamespace(chat=root / "chat", paint=root / "paint")


def _image(seed=5, size=(48, 40)):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# ---------------------------------------------------------------------------------------------- a Python without viscpm


_GUARD = f"""
import importlib.util, sys
sys.path.extend({{paths!r}})
if importlib.util.find_spec("viscpm") is not None:
    print("viscpm is importable in the isolated interpreter", file=sys.stderr)
    sys.exit({GUARD_EXIT})
"""


def run_without_viscpm(code, cwd, *args, extra_paths=(), timeout=300):
    """Run ``code`` in a fresh interpreter that sees site-packages but not viscpm (neither the repo nor the
    editable install: ``-S`` skips the ``.pth`` files that install its finder, ``-I`` the environment and cwd)."""
    prelude = _GUARD.format(paths=[*SITE_PACKAGES, *map(str, extra_paths)])
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(cwd),
        "HF_HOME": str(Path(cwd) / "hf-home"),  # remote-code modules are copied here
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "OMP_NUM_THREADS": str(torch.get_num_threads()),  # same threads, same float sums as this process
    }
    return subprocess.run([sys.executable, "-I", "-S", "-c", prelude + textwrap.dedent(code), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


_REMOTE_CODE = f"""
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

chat_repo, paint_repo, image_path, out_path = sys.argv[1:5]
results = {{}}
try:
    AutoProcessor.from_pretrained(chat_repo)
    results["untrusted"] = "loaded"
except Exception as error:
    results["untrusted"] = type(error).__name__ + ": " + str(error)
model = AutoModelForImageTextToText.from_pretrained(chat_repo, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(chat_repo, trust_remote_code=True)
image = Image.open(image_path)
inputs = processor(images=image, text={QUESTION!r}, return_tensors="pt")
with torch.no_grad():
    results["logits"] = model(**inputs).logits
    results["generated"] = model.generate(**inputs, max_new_tokens={MAX_NEW_TOKENS})
results["inputs"] = dict(inputs)
pipe = pipeline("image-text-to-text", model=chat_repo, trust_remote_code=True, device="cpu")
out = pipe(images=image, text={QUESTION!r}, return_full_text=False, generate_kwargs={{"max_new_tokens": {MAX_NEW_TOKENS}}})
results["pipeline_text"] = out[0]["generated_text"]

paint = DiffusionPipeline.from_pretrained(paint_repo, trust_remote_code=True)
paint.set_progress_bar_config(disable=True)
images = paint({PROMPT!r}, negative_prompt={NEGATIVE!r}, num_inference_steps={PAINT_STEPS}, height={PAINT_SIZE},
               width={PAINT_SIZE}, output_type="np", generator=torch.Generator().manual_seed(0)).images
results["paint_images"] = torch.from_numpy(images)
results["classes"] = [type(x).__module__ + "." + type(x).__name__ for x in (
    model, processor, processor.tokenizer, processor.image_processor, pipe.model, paint, paint.text_encoder,
    paint.tokenizer)]
results["viscpm_loaded"] = [name for name in sys.modules if name == "viscpm" or name.startswith("viscpm.")]
torch.save(results, out_path)
"""


@pytest.fixture(scope="module")
def remote(staged, tmp_path_factory):
    """What the staged folders give in a Python where viscpm cannot be imported."""
    root = tmp_path_factory.mktemp("remote")
    _image().save(root / "image.png")
    proc = run_without_viscpm(_REMOTE_CODE, root, staged.chat, staged.paint, root / "image.png", root / "out.pt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(root / "out.pt", weights_only=True)


def test_isolation_guard_fires_when_viscpm_is_importable(tmp_path):
    """The isolated interpreter really lacks viscpm; with the repo on the path the guard stops the run."""
    ok = run_without_viscpm("print(sys.flags.no_site, sys.flags.isolated)", tmp_path)
    assert ok.returncode == 0 and ok.stdout.split() == ["1", "1"], ok.stderr
    caught = run_without_viscpm("print('ran')", tmp_path, extra_paths=[REPO_ROOT])
    assert caught.returncode == GUARD_EXIT and "viscpm is importable" in caught.stderr and "ran" not in caught.stdout


def test_remote_code_classes_do_not_come_from_viscpm(remote):
    assert remote["viscpm_loaded"] == []
    for name in remote["classes"]:
        assert name.startswith(("transformers_modules.", "diffusers_modules.")), name
    assert "trust_remote_code" in remote["untrusted"]  # without it the custom code is refused


def test_remote_chat_model_and_processor_match_installed(remote, chat_info):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(chat_info.folder).eval()
    processor = AutoProcessor.from_pretrained(chat_info.folder)
    inputs = processor(images=_image(), text=QUESTION, return_tensors="pt")
    assert set(inputs) == set(remote["inputs"])
    for key, value in inputs.items():
        assert torch.equal(value, remote["inputs"][key]), key
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS)
    assert torch.allclose(remote["logits"], logits, atol=1e-5, rtol=0)
    assert torch.equal(remote["generated"], generated)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def test_remote_chat_pipeline_matches_installed(remote, chat_info):
    chat = VisCPMChat.from_pretrained(chat_info.folder, device="cpu")
    expected = chat.chat(_image(), QUESTION, max_new_tokens=MAX_NEW_TOKENS).answer
    assert expected and remote["pipeline_text"] == expected


def test_remote_paint_pipeline_matches_installed(remote, paint_files):
    pipe = VisCPMPaintPipeline.from_pretrained(paint_files.folder)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=PAINT_STEPS, height=PAINT_SIZE,
                  width=PAINT_SIZE, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.std() > 0.05
    assert np.abs(remote["paint_images"].numpy() - images).max() <= 1e-5


def test_staged_chat_folder(staged, chat_info):
    folder = staged.chat
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_viscpm_chat.VisCPMChatConfig",
        "AutoModel": "modeling_viscpm_chat.VisCPMChatForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_viscpm_chat.VisCPMChatForConditionalGeneration",
    }
    tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer["auto_map"]["AutoTokenizer"] == ["tokenization_cpmbee.CpmBeeTokenizer", None]
    processor = json.loads((folder / "processor_config.json").read_text())
    assert processor["auto_map"] == {"AutoProcessor": "processing_viscpm_chat.VisCPMChatProcessor"}
    assert processor["image_processor"]["auto_map"]["AutoImageProcessor"] == "image_processing_viscpm.VisCPMImageProcessor"
    code = sorted(p.name for p in folder.glob("*.py"))
    assert code == ["configuration_cpmbee.py", "configuration_viscpm_chat.py", "generation_cpmbee.py",
                    "image_processing_viscpm.py", "modeling_cpmbee.py", "modeling_viscpm_chat.py",
                    "processing_viscpm_chat.py", "tokenization_cpmbee.py"]
    for name in code:  # the code files are the package's own, byte for byte
        assert (folder / name).read_bytes() == (hub.MODELING_DIR / name).read_bytes()
    assert (folder / "model.safetensors").read_bytes() == (chat_info.folder / "model.safetensors").read_bytes()
    card = (folder / "README.md").read_text()
    assert hashlib.sha256(chat_info.checkpoint.read_bytes()).hexdigest() in card
    assert 'pipeline("image-text-to-text", model="me/viscpm-chat-tiny", trust_remote_code=True)' in card


def test_staged_paint_folder(staged):
    folder = staged.paint
    index = json.loads((folder / "model_index.json").read_text())
    module, name = index["_class_name"]  # the pipeline file imports its components' files: an entry module
    assert name == "VisCPMPaintPipeline" and (folder / f"{module}.py").is_file()
    module, name = index["text_encoder"]
    assert name == "VisCPMPaintTextEncoder" and (folder / "text_encoder" / f"{module}.py").is_file()
    assert index["tokenizer"] == ["tokenization_cpmbee", "CpmBeeTokenizer"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert (folder / "pipeline_viscpm_paint.py").is_file() and (folder / "tokenizer/tokenization_cpmbee.py").is_file()
    for needed in ("modeling_viscpm_paint.py", "modeling_cpmbee.py", "configuration_cpmbee.py", "generation_cpmbee.py"):
        assert (folder / "text_encoder" / needed).is_file(), needed
    encoder = json.loads((folder / "text_encoder/config.json").read_text())
    assert encoder["auto_map"]["AutoModel"] == "modeling_viscpm_paint.VisCPMPaintTextEncoder"


def test_code_closure_refuses_imports_a_user_may_lack(tmp_path, monkeypatch):
    (tmp_path / "modeling_a.py").write_text("import torch\nfrom .modeling_b import B\n")
    (tmp_path / "modeling_b.py").write_text("from viscpm.convert import ConversionError\nclass B: pass\n")
    (tmp_path / "modeling_c.py").write_text("from ..x import y\n")
    monkeypatch.setattr(hub, "MODELING_DIR", tmp_path)
    with pytest.raises(hub.HubError, match="modeling_b.py imports viscpm.convert"):
        hub.code_closure(["modeling_a"])
    with pytest.raises(hub.HubError, match="flat relative imports"):
        hub.code_closure(["modeling_c"])
    monkeypatch.undo()
    assert hub.code_closure(["modeling_viscpm_chat"])[0] == "modeling_viscpm_chat.py"


# ---------------------------------------------------------------------------------------------- push script


def _card_metadata(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_push_chat_commits_the_staged_repo(fake_api, staged, chat_info, capsys):
    status = push_main([str(chat_info.folder), "me/viscpm-chat-tiny", "--private", "--revision", "dev", "--create-pr",
                        "--commit-message", "add tiny chat", "--source-checkpoint", str(chat_info.checkpoint)])
    assert status == 0, capsys.readouterr().err
    assert _calls(fake_api, "init") == [{"token": "hf_test_token"}]
    assert _calls(fake_api, "create_repo") == [{"repo_id": "me/viscpm-chat-tiny", "private": True, "exist_ok": True}]
    assert _calls(fake_api, "create_branch") == [{"repo_id": "me/viscpm-chat-tiny", "branch": "dev", "exist_ok": True}]
    (commit,) = _calls(fake_api, "create_commit")
    assert (commit["revision"], commit["create_pr"], commit["commit_message"]) == ("dev", True, "add tiny chat")
    staged_files = {p.relative_to(staged.chat).as_posix(): p.read_bytes() for p in staged.chat.rglob("*") if p.is_file()}
    assert commit["files"] == staged_files  # --stage-dir writes exactly what a push uploads
    meta = _card_metadata(commit["files"]["README.md"].decode())
    assert meta["pipeline_tag"] == "image-text-to-text" and meta["library_name"] == "transformers"
    assert meta["base_model"] == "openbmb/VisCPM-Chat" and meta["language"] == ["zh", "en"]
    assert meta["license"] == "other" and "custom_code" in meta["tags"]
    assert "pushed me/viscpm-chat-tiny" in capsys.readouterr().out


def test_push_paint_defaults(fake_api, paint_files):
    assert push_main([str(paint_files.folder), "me/viscpm-paint-tiny"]) == 0
    assert _calls(fake_api, "create_repo") == [{"repo_id": "me/viscpm-paint-tiny", "private": None, "exist_ok": True}]
    assert _calls(fake_api, "create_branch") == []
    (commit,) = _calls(fake_api, "create_commit")
    assert commit["revision"] is None and commit["create_pr"] is False
    assert "pipeline_viscpm_paint.py" in commit["files"] and "unet/diffusion_pytorch_model.safetensors" in commit["files"]
    meta = _card_metadata(commit["files"]["README.md"].decode())
    assert (meta["pipeline_tag"], meta["library_name"], meta["base_model"]) == (
        "text-to-image", "diffusers", "openbmb/VisCPM-Paint")
    assert "DiffusionPipeline.from_pretrained(\"me/viscpm-paint-tiny\", trust_remote_code=True)" in (
        commit["files"]["README.md"].decode())


def test_dry_run_prints_files_and_card_without_network(monkeypatch, chat_info, capsys):
    def no_network(*args, **kwargs):
        raise AssertionError("--dry-run must not create an HfApi")

    monkeypatch.setattr(hub, "HfApi", no_network)
    assert push_main([str(chat_info.folder), "me/viscpm-chat-tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for name in ("model.safetensors", "modeling_viscpm_chat.py", "config.json", "README.md", "total, 15 files"):
        assert name in out, name
    assert "pipeline_tag: image-text-to-text" in out and "the source file was not recorded" in out


def test_push_adapter_card(fake_api, tmp_path):
    adapter = tmp_path / "adapter-de"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": "me/viscpm-chat-hf", "r": 8}))
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    assert push_main([str(adapter), "me/viscpm-chat-de", "--language", "de"]) == 0
    (commit,) = _calls(fake_api, "create_commit")
    assert sorted(commit["files"]) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = commit["files"]["README.md"].decode()
    meta = _card_metadata(card)
    assert (meta["library_name"], meta["base_model"], meta["language"]) == ("peft", "me/viscpm-chat-hf", ["de"])
    assert 'PeftModel.from_pretrained(base, "me/viscpm-chat-de")' in card


def test_push_errors_are_one_line(fake_api, tmp_path, chat_info, monkeypatch, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hi")
    (other / "weights.pt").write_bytes(b"x")
    assert push_main([str(other), "me/x"]) == 1
    err = capsys.readouterr().err
    assert "notes.txt, weights.pt" in err and "expected config.json" in err and "convert it first" in err
    assert push_main([str(tmp_path / "missing"), "me/x"]) == 1
    assert "not found" in capsys.readouterr().err
    assert push_main([str(chat_info.folder), "not a repo id"]) == 1
    assert "not a Hub repo id" in capsys.readouterr().err
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "x").write_text("x")
    assert push_main([str(chat_info.folder), "me/x", "--stage-dir", str(tmp_path / "stage")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(hub, "get_token", lambda: None)
    assert push_main([str(chat_info.folder), "me/x"]) == 1
    assert "HF_TOKEN" in capsys.readouterr().err
    assert _calls(fake_api, "create_commit") == []


# ---------------------------------------------------------------------------------------------- original format


def _add_to_fake_hub(cache, repo_id, files, commit="0123456789abcdef0123456789abcdef01234567"):
    """Lay files out as huggingface_hub's cache does: blobs named by sha256, snapshot symlinks, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, source in files.items():
        data = Path(source).read_bytes() if isinstance(source, Path) else source
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return commit


@pytest.fixture
def fake_hub(tmp_path, chat_info, paint_files, vocab_file, monkeypatch):
    monkeypatch.delenv("VISCPM_CACHE", raising=False)
    cache = tmp_path / "hub-cache"
    commit = _add_to_fake_hub(cache, "openbmb/VisCPM-Chat", {"viscpm_chat_balance_checkpoint.pt": chat_info.checkpoint,
                                                             "README.md": b"# VisCPM-Chat\n"})
    _add_to_fake_hub(cache, "openbmb/VisCPM-Paint", {"viscpm_paint_zhplus_checkpoint.pt": paint_files.checkpoint})
    _add_to_fake_hub(cache, "someone/other", {"README.md": b"hi", "notes.txt": b"x"})
    # The vocabulary, fetched from the Hub where the original package (whose bee.txt comes first) is not installed.
    _add_to_fake_hub(cache, original_format.VOCAB_REPO, {original_format.VOCAB_FILENAME: Path(vocab_file)})
    conversions = []
    convert = original_format._convert
    monkeypatch.setattr(original_format, "_convert", lambda *a, **k: (conversions.append(a[1]), convert(*a, **k)))
    return SimpleNamespace(cache=cache, commit=commit, conversions=conversions)


def _chat_options(chat_info, fake_hub):
    return dict(cache_dir=str(fake_hub.cache), local_files_only=True, llm_config=str(chat_info.llm),
                vision_config=str(chat_info.vision), query_num=CHAT_QUERY_NUM, device="cpu")


def _entries(fake_hub):
    root = fake_hub.cache / "viscpm-converted"
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) if root.exists() else []


def test_chat_from_original_repo_converts_once(fake_hub, chat_info):
    first = VisCPMChat.from_pretrained("openbmb/VisCPM-Chat", variant="balance", **_chat_options(chat_info, fake_hub))
    again = VisCPMChat.from_pretrained("openbmb/VisCPM-Chat", variant="balance", **_chat_options(chat_info, fake_hub))
    assert len(fake_hub.conversions) == 1 and len(_entries(fake_hub)) == 1
    reference = VisCPMChat.from_pretrained(chat_info.folder, device="cpu")
    expected = reference.chat(_image(), QUESTION, max_new_tokens=MAX_NEW_TOKENS).answer
    assert first.chat(_image(), QUESTION, max_new_tokens=MAX_NEW_TOKENS).answer == expected
    assert again.chat(_image(), QUESTION, max_new_tokens=MAX_NEW_TOKENS).answer == expected

    entry = fake_hub.cache / "viscpm-converted" / _entries(fake_hub)[0]
    info = json.loads((entry / hub.SOURCE_INFO_FILE).read_text())
    sha = hashlib.sha256(chat_info.checkpoint.read_bytes()).hexdigest()
    assert info == {"repo": "openbmb/VisCPM-Chat", "file": "viscpm_chat_balance_checkpoint.pt", "variant": "balance",
                    "revision": fake_hub.commit, "sha256": sha, "kind": "chat"}
    card = hub.prepare_upload(entry, "me/viscpm-chat-balance").card  # the push names where it came from
    assert sha in card and "openbmb/VisCPM-Chat" in card and "viscpm_chat_balance_checkpoint.pt" in card


def test_paint_from_original_repo(fake_hub, paint_files):
    painter = VisCPMPaint.from_pretrained(
        "openbmb/VisCPM-Paint", variant="zhplus", cache_dir=str(fake_hub.cache), local_files_only=True,
        llm_config=str(paint_files.llm), sd_base=str(paint_files.sd_base), image_safety_checker=False,
        prompt_safety_checker=False, add_ranker=False, device="cpu")
    reference = VisCPMPaintPipeline.from_pretrained(paint_files.folder)
    reference.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=PAINT_STEPS, height=PAINT_SIZE, width=PAINT_SIZE, output_type="np")
    got = painter.pipeline(PROMPT, generator=torch.Generator().manual_seed(1), **kwargs).images
    expected = reference(PROMPT, generator=torch.Generator().manual_seed(1), **kwargs).images
    assert np.abs(got - expected).max() <= 1e-6 and expected.std() > 0.05
    assert len(fake_hub.conversions) == 1


def test_local_checkpoint_file(fake_hub, chat_info, tmp_path):
    local = tmp_path / "viscpm_chat_balance_checkpoint.pt"
    shutil.copyfile(chat_info.checkpoint, local)
    options = _chat_options(chat_info, fake_hub)
    first = VisCPMChat.from_pretrained(local, **options)
    VisCPMChat.from_pretrained(str(local), **options)
    assert len(fake_hub.conversions) == 1
    assert Path(first.model.name_or_path).parent == fake_hub.cache / "viscpm-converted"
    folder_of_checkpoints = tmp_path / "checkpoints"  # a folder in the original format: the variant picks the file
    folder_of_checkpoints.mkdir()
    shutil.copyfile(chat_info.checkpoint, folder_of_checkpoints / "viscpm_chat_zhplus_checkpoint.pt")
    (folder_of_checkpoints / "viscpm_chat_balance_checkpoint.pt").symlink_to(local)
    VisCPMChat.from_pretrained(folder_of_checkpoints, variant="zhplus", **options)
    assert len(fake_hub.conversions) == 2


def test_interrupted_conversion_leaves_no_entry(fake_hub, chat_info, monkeypatch):
    import viscpm.conversion.common as common

    save = common.save_model_folder  # what the Chat converter writes its folder with

    def crash_midway(folder, *args, **kwargs):
        save(folder, *args, **kwargs)  # everything is written ...
        raise KeyboardInterrupt  # ... and then the user presses Ctrl-C

    monkeypatch.setattr(common, "save_model_folder", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        VisCPMChat.from_pretrained("openbmb/VisCPM-Chat", variant="balance", **_chat_options(chat_info, fake_hub))
    assert _entries(fake_hub) == []  # neither an entry nor a partial folder
    monkeypatch.setattr(common, "save_model_folder", save)
    VisCPMChat.from_pretrained("openbmb/VisCPM-Chat", variant="balance", **_chat_options(chat_info, fake_hub))
    assert len(_entries(fake_hub)) == 1 and len(fake_hub.conversions) == 2


_CONCURRENT = """
import json, sys, time
from pathlib import Path
import viscpm.conversion.original_format as original_format

checkpoint, cache, llm, vision, vocab, go = sys.argv[1:7]
converted = []
convert = original_format._convert
def counting(*args, **kwargs):
    converted.append(1)
    time.sleep(1.0)  # keep the lock long enough for the other process to have to wait
    return convert(*args, **kwargs)
original_format._convert = counting
while not Path(go).exists():
    time.sleep(0.01)
options = dict(cache_dir=cache, llm_config=llm, vision_config=vision, vocab_file=vocab, query_num=64)
path = original_format.resolve_original_format(checkpoint, "chat", None, options)
print(json.dumps({"path": str(path), "converted": len(converted)}))
"""


def test_two_processes_produce_one_entry(tmp_path, chat_info, vocab_file):
    cache, go = tmp_path / "cache", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("VISCPM_CACHE", None)
    args = [chat_info.checkpoint, cache, chat_info.llm, chat_info.vision, vocab_file, go]
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT, *map(str, args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path) for _ in range(2)]
    go.touch()
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(o["converted"] for o in outputs) == [0, 1]
    assert outputs[0]["path"] == outputs[1]["path"]
    assert [p.name for p in (cache / "viscpm-converted").iterdir() if not p.name.endswith(".lock")] == [
        Path(outputs[0]["path"]).name]


def test_sources_in_neither_format(fake_hub, chat_info, tmp_path):
    options = _chat_options(chat_info, fake_hub)
    with pytest.raises(ConversionError, match=r"someone/other is neither .*expected config\.json.*README\.md, notes\.txt"):
        VisCPMChat.from_pretrained("someone/other", **options)
    folder = tmp_path / "stuff"
    folder.mkdir()
    (folder / "readme.txt").write_text("x")
    with pytest.raises(ConversionError, match=r"neither a converted VisCPM-Chat.*found: readme\.txt"):
        VisCPMChat.from_pretrained(folder, **options)
    with pytest.raises(ConversionError, match=r"no variant 'large'; choose one of 'v1.1', 'balance', 'zhplus'"):
        VisCPMChat.from_pretrained("openbmb/VisCPM-Chat", variant="large", **options)
    with pytest.raises(ConversionError, match="holds VisCPM-Paint, not VisCPM-Chat"):
        VisCPMChat.from_pretrained("openbmb/VisCPM-Paint", **options)
    with pytest.raises(ConversionError, match="not found"):
        VisCPMChat.from_pretrained(tmp_path / "missing.pt", **options)
    paint_checkpoint = (fake_hub.cache / "models--openbmb--VisCPM-Paint" / "snapshots" / fake_hub.commit /
                        "viscpm_paint_zhplus_checkpoint.pt")
    with pytest.raises(ConversionError, match="is a VisCPM-Paint checkpoint"):  # the converter checks the content
        VisCPMChat.from_pretrained(paint_checkpoint, **options)
    assert _entries(fake_hub) == []


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_pickle_that_runs_code_is_refused(fake_hub, chat_info, tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil_checkpoint.pt"
    torch.save({"llm.input_embedding.weight": torch.zeros(2, 2), "extra": _RunsCode(str(marker))}, evil)
    # The safe load refuses it before anything runs. (convert.py words this as "corrupt ... Weights only load failed"
    # when torch reports a *blocked module*, and as "holds a pickled Python object" for other globals.)
    with pytest.raises(ConversionError, match=r"evil_checkpoint\.pt .*(pickled Python object|Weights only load failed)"):
        VisCPMChat.from_pretrained(evil, **_chat_options(chat_info, fake_hub))
    assert not marker.exists() and _entries(fake_hub) == []


def test_converted_sources_pass_through(chat_info):
    options = {"revision": "main"}
    assert resolve_original_format(chat_info.folder, "chat", None, options) == chat_info.folder
    assert options == {"revision": "main"}
    options = {"llm_config": "x.json"}
    assert resolve_original_format(chat_info.folder, "chat", "fp16", options) == chat_info.folder
    assert options == {"variant": "fp16"}  # conversion options are taken out, the weights variant goes on
    with pytest.raises(ConversionError, match="converted VisCPM-Chat folder, not VisCPM-Paint"):
        resolve_original_format(chat_info.folder, "paint", None, {})
