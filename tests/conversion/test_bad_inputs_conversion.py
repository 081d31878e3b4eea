"""Bad inputs to the converters and to the Hub push, as a careless or hostile user gives them.

Every case runs the script's `main` on inputs laid out under `tmp_path` and asserts the exact outcome: the exit
status, the words of the one-line error (or of the warnings), which files appear and with which modes, and that
nothing else under `tmp_path` changed (content, size, mode and modification time of every file and link).

What the push cases pin down (see conversion/push_to_hub.py): a link that points outside the folder, nowhere, or to
a folder is *refused* (exit 1, nothing staged or sent, the links named), in `--dry-run` and `--stage-dir` as in a
push; a link to a file inside the folder is uploaded as that file; hidden files and folders are left out with a
note unless `--include-dotfiles`, and `.git` never goes up; repo ids huggingface_hub rejects fail before anything
else. The symlinks are real ones pointing out of the pushed folder.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CHAT_QUERY_NUM, tiny_unet, tiny_vae, write_sd_base
from fake_hub_api import calls
from fake_hub_api import fake_api  # noqa: F401  (a fixture)
from originals import TINY_ORIGINAL_CONFIG, cpmbee_checkpoint

import viscpm.conversion.push_to_hub as hub
from viscpm.conversion import convert_cpmbee, convert_viscpm_chat, convert_viscpm_paint
from viscpm.conversion.original_format import resolve_original_format

MAINS = {"cpmbee": convert_cpmbee.main, "chat": convert_viscpm_chat.main, "paint": convert_viscpm_paint.main}
NAN_KEYS = {  # an original key per converter whose tensor gets a NaN and an inf
    "cpmbee": "encoder.layers.0.ffn.ffn.w_out.weight",
    "chat": "vpm.beit3.encoder.layers.0.ffn.A.fc1.weight",
    "paint": "unet.conv_in.weight",
}


# ---------------------------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict:
    """Everything under ``root`` as ``{relative path: (kind, mode, size, mtime, content)}``: the content is the
    sha256 of a file under 1 MiB, the inode of a larger one (the checkpoints), the target of a link."""
    entries = {}
    for here, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(here, name)
            info = path.lstat()
            key = path.relative_to(root).as_posix()
            if path.is_symlink():
                entries[key] = ("link", os.readlink(path))
            elif path.is_dir():
                entries[key] = ("dir", oct(info.st_mode))
            else:
                content = hashlib.sha256(path.read_bytes()).hexdigest() if info.st_size < 1 << 20 else info.st_ino
                entries[key] = ("file", oct(info.st_mode), info.st_size, info.st_mtime_ns, content)
    return entries


def run(main, argv, capsys):
    """``main(argv)`` -> (status, stdout lines, stderr lines); usage errors (SystemExit) give their status."""
    try:
        status = main([str(arg) for arg in argv])
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out.strip().splitlines(), captured.err.strip().splitlines()


def assert_one_line_error(err, words):
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and "Traceback" not in err[0], err
    for word in words:
        assert word in err[0], (word, err[0])


def modes(folder: Path) -> set:
    """The distinct (kind, permission bits) of everything under ``folder``, itself included."""
    found = {("dir", oct(folder.stat().st_mode & 0o777))}
    for path in folder.rglob("*"):
        found.add(("dir" if path.is_dir() else "file", oct(path.lstat().st_mode & 0o777)))
    return found


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def umask_modes(mask):
    return {("dir", oct(0o777 & ~mask)), ("file", oct(0o666 & ~mask))}


@pytest.fixture
def umask(request):
    """Run the test under the umask given as the parameter (restored afterwards)."""
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _hard_link_tree(source: Path, target: Path):
    """Lay out ``source`` again at ``target`` without copying the bytes (the inputs are a few tens of MB)."""
    if source.is_dir():
        shutil.copytree(source, target, copy_function=os.link)
    else:
        os.link(source, target)


# ---------------------------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def sources(tmp_path_factory, chat_files, vocab_file):
    """Tiny original CPM-Bee, Chat and Paint checkpoints with their configs, a local SD base, the vocabulary."""
    root = tmp_path_factory.mktemp("bad-input-sources")
    _, bee = cpmbee_checkpoint(seed=1)
    torch.save(bee, root / "bee.pt")
    (root / "bee.json").write_text(json.dumps(TINY_ORIGINAL_CONFIG))
    _, chat_root, chat_checkpoint = chat_files
    shutil.copyfile(chat_checkpoint, root / "chat.pt")
    shutil.copyfile(chat_root / "llm.json", root / "llm.json")
    shutil.copyfile(chat_root / "vision.json", root / "vision.json")
    unet = tiny_unet()
    write_sd_base(root / "sd-base", unet, tiny_vae())
    width, cross = TINY_ORIGINAL_CONFIG["dim_model"], unet.config.cross_attention_dim
    paint = {"llm." + key: tensor for key, tensor in bee.items()}
    generator = torch.Generator().manual_seed(4)
    paint["trans_block.w_out_res.weight"] = torch.randn(cross, width, generator=generator)
    paint["trans_block.layernorm.weight"] = torch.ones(cross)
    paint["trans_block.layernorm.bias"] = torch.zeros(cross)
    paint.update({"unet." + key: tensor.detach().clone() for key, tensor in unet.state_dict().items()})
    torch.save(paint, root / "paint.pt")
    shutil.copyfile(vocab_file, root / "bee.txt")
    return root


@pytest.fixture
def inp(sources, tmp_path):
    """The sources under ``tmp_path/in`` (hard links), so that the "nothing else changed" checks cover them."""
    _hard_link_tree(sources, tmp_path / "in")
    return tmp_path / "in"


def base_options(kind, inp, tmp_path):
    options = {"--output-dir": tmp_path / "out", "--vocab-file": inp / "bee.txt", "--no-progress": True}
    if kind == "cpmbee":
        options.update({"--checkpoint": inp / "bee.pt", "--config": inp / "bee.json"})
    elif kind == "chat":
        options.update({"--checkpoint": inp / "chat.pt", "--llm-config": inp / "llm.json",
                        "--vision-config": inp / "vision.json", "--query-num": CHAT_QUERY_NUM})
    else:
        options.update({"--checkpoint": inp / "paint.pt", "--llm-config": inp / "bee.json",
                        "--sd-base": inp / "sd-base"})
    return options


def argv_of(options):
    argv = []
    for option, value in options.items():
        if value is True:
            argv.append(option)
        elif value is not None:
            argv += [option, value]
    return argv


def _write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _link(path: Path, target) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    return path


def _truncated(inp, name):
    data = (inp / name).read_bytes()
    return _write(inp / f"truncated-{name}", data[: len(data) // 2])


def _inside_output(tmp_path, source, option):
    """Put the input ``source`` into a non-empty output folder and ask to overwrite that folder."""
    out = tmp_path / "out"
    out.mkdir()
    _hard_link_tree(source, out / source.name)
    return {option: out / source.name, "--overwrite": True}


def _sd_base_with(inp, name, edit):
    base = inp.parent / name
    shutil.copytree(inp / "sd-base", base)
    edit(base)
    return {"--sd-base": base}


def _unet_config_edit(**changes):
    def edit(base):
        config = json.loads((base / "unet" / "config.json").read_text())
        (base / "unet" / "config.json").write_text(json.dumps({**config, **changes}))
    return edit


# ---------------------------------------------------------------------------------------------- converters

# (kind, case id, options to change given (inp, tmp_path), exit status, words of the one error line)
CONVERTER_CASES = [
    # Paths: typos, directories, dangling links, files where folders are expected.
    ("cpmbee", "checkpoint-typo", lambda i, t: {"--checkpoint": i / "be.pt"}, 1, ["be.pt", "not found", "check the path"]),
    ("chat", "checkpoint-typo", lambda i, t: {"--checkpoint": i / "chatt.pt"}, 1, ["chatt.pt", "not found"]),
    ("paint", "checkpoint-typo", lambda i, t: {"--checkpoint": i / "pain.pt"}, 1, ["pain.pt", "not found"]),
    ("cpmbee", "checkpoint-dangling-link", lambda i, t: {"--checkpoint": _link(i / "gone.pt", i / "nothing.pt")}, 1,
     ["gone.pt", "not found"]),
    ("chat", "checkpoint-is-a-directory", lambda i, t: {"--checkpoint": i}, 1,
     ["is a directory", "pass the checkpoint file itself", "chat.pt"]),
    ("paint", "checkpoint-is-a-directory", lambda i, t: {"--checkpoint": i / "sd-base"}, 1, ["is a directory"]),
    ("chat", "checkpoint-truncated", lambda i, t: {"--checkpoint": _truncated(i, "chat.pt")}, 1,
     ["truncated-chat.pt", "truncated or corrupt", "download or copy"]),
    ("paint", "checkpoint-truncated", lambda i, t: {"--checkpoint": _truncated(i, "paint.pt")}, 1,
     ["truncated-paint.pt", "truncated or corrupt"]),
    ("cpmbee", "config-is-a-directory", lambda i, t: {"--config": i / "sd-base"}, 1,
     ["config", "sd-base is a directory", "pass the original CPM-Bee config JSON file"]),
    ("cpmbee", "config-is-the-checkpoint", lambda i, t: {"--config": i / "bee.pt"}, 1,
     ["bee.pt is not a text file", "pass the original CPM-Bee config"]),
    ("chat", "vision-config-typo", lambda i, t: {"--vision-config": i / "visoin.json"}, 1,
     ["vision config", "visoin.json not found", "EncoderConfig"]),
    ("chat", "llm-config-is-a-directory", lambda i, t: {"--llm-config": i}, 1, ["is a directory"]),
    ("cpmbee", "vocab-is-a-directory", lambda i, t: {"--vocab-file": i}, 1, ["is a directory", "--vocab-file"]),
    ("paint", "vocab-typo", lambda i, t: {"--vocab-file": i / "bee.tx"}, 1, ["bee.tx not found", "--vocab-file"]),
    ("cpmbee", "vocab-not-a-vocabulary", lambda i, t: {"--vocab-file": _write(i / "small.txt", "a\nb\n")}, 1,
     ["cannot read vocabulary", "small.txt", "pass the CPM-Bee vocabulary"]),
    # Output folders: a file, under a file, or a folder that holds an input and would be deleted by --overwrite.
    ("cpmbee", "output-is-a-file", lambda i, t: {"--output-dir": _write(t / "out.txt", "x")}, 1,
     ["out.txt exists and is not a directory", "choose another output folder"]),
    ("chat", "output-under-a-file", lambda i, t: {"--output-dir": _write(t / "notes", "x") / "out"}, 1,
     ["notes is a file", "choose another output folder"]),
    ("cpmbee", "output-holds-the-checkpoint", lambda i, t: _inside_output(t, i / "bee.pt", "--checkpoint"), 1,
     ["out/bee.pt", "--overwrite would delete it", "choose another output folder"]),
    ("cpmbee", "output-holds-the-config", lambda i, t: _inside_output(t, i / "bee.json", "--config"), 1,
     ["out/bee.json", "--overwrite would delete it"]),
    ("chat", "output-holds-the-vision-config", lambda i, t: _inside_output(t, i / "vision.json", "--vision-config"), 1,
     ["out/vision.json", "--overwrite would delete it"]),
    ("paint", "output-holds-the-sd-base", lambda i, t: _inside_output(t, i / "sd-base", "--sd-base"), 1,
     ["out/sd-base", "--overwrite would delete it"]),
    # Configs that do not fit: wrong kind, unsupported flags, sizes that are not sizes.
    ("cpmbee", "config-size-is-a-string", lambda i, t: {"--config": _write(
        i / "str.json", {**TINY_ORIGINAL_CONFIG, "dim_model": "32"})}, 1,
     ["str.json", "dim_model='32' (must be a positive whole number)", "fix the config"]),
    ("cpmbee", "config-negative-and-zero", lambda i, t: {"--config": _write(
        i / "neg.json", {**TINY_ORIGINAL_CONFIG, "num_layers": -1, "num_heads": 0})}, 1,
     ["neg.json", "num_layers=-1", "num_heads=0"]),
    ("cpmbee", "config-eps-not-a-number", lambda i, t: {"--config": _write(
        i / "eps.json", {**TINY_ORIGINAL_CONFIG, "eps": "tiny"})}, 1, ["eps='tiny' (must be a positive number)"]),
    ("chat", "vision-config-fractional-layers", lambda i, t: {"--vision-config": _write(
        i / "v.json", {"encoder_embed_dim": 24, "encoder_attention_heads": 4, "encoder_layers": 2.5})}, 1, ["v.json", "encoder_layers=2.5"]),
    ("chat", "vision-config-zero-heads", lambda i, t: {"--vision-config": _write(
        i / "v.json", {"encoder_embed_dim": 24, "encoder_attention_heads": 0})}, 1,
     ["v.json", "num_attention_heads=0 (must be a positive whole number)"]),
    ("chat", "vision-config-patch-size-string", lambda i, t: {"--vision-config": _write(
        i / "v.json", {"encoder_embed_dim": 24, "encoder_attention_heads": 4, "patch_size": "8"})}, 1,
     ["v.json", "patch_size='8' (must be a positive whole number)"]),
    ("chat", "vision-config-of-another-model", lambda i, t: {"--vision-config": _write(
        i / "v.json", {"model_type": "cpmbee"})}, 1, ["v.json", "model_type is 'cpmbee', not 'viscpm_vision'"]),
    ("chat", "vision-config-unsupported-flag", lambda i, t: {"--vision-config": _write(
        i / "v.json", {"encoder_embed_dim": 24, "deepnorm": True})}, 1, ["unsupported BEiT-3 settings", "deepnorm"]),
    ("cpmbee", "config-json-list", lambda i, t: {"--config": _write(i / "list.json", [1, 2])}, 1,
     ["list.json holds a JSON list, not an object"]),
    ("chat", "query-num-negative", lambda i, t: {"--query-num": -4}, 2, ["--query-num must be positive"]),
    ("chat", "query-num-wrong", lambda i, t: {"--query-num": 8}, 1, ["query_num=64 not 8", "--query-num"]),
    # The wrong kind of checkpoint for the converter.
    ("chat", "cpmbee-checkpoint", lambda i, t: {"--checkpoint": i / "bee.pt"}, 1,
     ["no vision encoder", "convert_cpmbee.py"]),
    ("paint", "chat-checkpoint", lambda i, t: {"--checkpoint": i / "chat.pt"}, 1,
     ["is a VisCPM-Chat checkpoint", "Chat converter"]),
    ("paint", "cpmbee-checkpoint", lambda i, t: {"--checkpoint": i / "bee.pt"}, 1,
     ["not a VisCPM-Paint checkpoint", "llm.* (CPM-Bee)", "trans_block.*"]),
    ("chat", "paint-checkpoint", lambda i, t: {"--checkpoint": i / "paint.pt"}, 1, ["is a VisCPM-Paint checkpoint"]),
    # The Stable Diffusion base of Paint.
    ("paint", "sd-base-typo", lambda i, t: {"--sd-base": "./sd-bsae"}, 1, ["--sd-base ./sd-bsae not found"]),
    ("paint", "sd-base-is-a-file", lambda i, t: {"--sd-base": i / "bee.json"}, 1,
     ["--sd-base", "is a file", "vae/, scheduler/ and unet/config.json"]),
    ("paint", "sd-base-without-unet-config", lambda i, t: _sd_base_with(
        i, "sd-no-unet", lambda base: (base / "unet" / "config.json").unlink()), 1, ["has no unet/config.json"]),
    ("paint", "sd-base-other-cross-attention", lambda i, t: _sd_base_with(
        i, "sd-wide", _unet_config_edit(cross_attention_dim=24)), 1,
     ["outputs 16 features", "cross_attention_dim=24", "Stable Diffusion base it was trained on"]),
]


@pytest.mark.parametrize(("kind", "case", "change", "status", "words"), CONVERTER_CASES,
                         ids=[f"{kind}-{case}" for kind, case, *_ in CONVERTER_CASES])
def test_converter_bad_input(kind, case, change, status, words, inp, tmp_path, capsys):
    options = base_options(kind, inp, tmp_path)
    options.update(change(inp, tmp_path))
    before = snapshot(tmp_path)
    code, out, err = run(MAINS[kind], argv_of(options), capsys)
    assert code == status, err
    assert_one_line_error(err, words)
    assert out == []
    assert snapshot(tmp_path) == before  # no output, no partial folder, no input touched


def _with_nonfinite(inp, kind):
    """The checkpoint of ``kind`` with a NaN and an inf in one tensor (the key of NAN_KEYS)."""
    name = {"cpmbee": "bee.pt", "chat": "chat.pt", "paint": "paint.pt"}[kind]
    state = torch.load(inp / name, weights_only=True)
    tensor = state[NAN_KEYS[kind]].clone()
    tensor.view(-1)[0], tensor.view(-1)[1] = float("nan"), float("inf")
    state[NAN_KEYS[kind]] = tensor
    torch.save(state, inp / f"nan-{name}")
    return inp / f"nan-{name}"


@pytest.mark.parametrize("kind", ["cpmbee", "chat", "paint"])
def test_nonfinite_weights_warn_naming_the_tensor(kind, inp, tmp_path, capsys):
    """NaN/inf weights: the conversion goes on (it is the user's checkpoint) with one warning naming the tensor by
    its original key and saying what it means; the written tensor holds the same values."""
    options = {**base_options(kind, inp, tmp_path), "--checkpoint": _with_nonfinite(inp, kind)}
    before = snapshot(tmp_path)
    code, out, err = run(MAINS[kind], argv_of(options), capsys)
    assert code == 0, err
    assert out == [f"wrote {tmp_path / 'out'}"]
    warnings = [line for line in err if line.startswith("warning: ")]
    assert len(warnings) == 1, err
    for word in ("1 tensor(s) with NaN or infinite values", f"{NAN_KEYS[kind]} (1 NaN, 1 inf of",
                 "computes NaN", "written as they are"):
        assert word in warnings[0], (word, warnings[0])
    assert not [line for line in err if line.startswith("error")]
    after = snapshot(tmp_path)
    assert {key: value for key, value in after.items() if not key.startswith("out")} == before


def test_float16_overflow_warns(inp, tmp_path, capsys):
    """A weight beyond float16's range becomes inf when written as float16: said, with the fix."""
    state = torch.load(inp / "bee.pt", weights_only=True)
    state["input_embedding.weight"] = state["input_embedding.weight"].clone()
    state["input_embedding.weight"][5, :3] = 1e6
    torch.save(state, inp / "big.pt")
    options = {**base_options("cpmbee", inp, tmp_path), "--checkpoint": inp / "big.pt", "--dtype": "float16"}
    code, out, err = run(convert_cpmbee.main, argv_of(options), capsys)
    assert code == 0 and out == [f"wrote {tmp_path / 'out'}"], err
    assert len(err) == 1 and err[0].startswith("warning: "), err
    for word in ("1 tensor(s)", "input_embedding.weight (3 value(s))", "become inf", "--dtype"):
        assert word in err[0], (word, err[0])
    code, out, err = run(convert_cpmbee.main, argv_of({**options, "--dtype": "bfloat16", "--output-dir":
                                                       tmp_path / "out-bf16"}), capsys)
    assert code == 0 and err == []  # bfloat16 has float32's range: nothing to say


# ---------------------------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("umask", [0o022, 0o027], indirect=True, ids=["umask-022", "umask-027"])
@pytest.mark.parametrize("kind", ["cpmbee", "chat", "paint"])
def test_converted_files_follow_the_umask(kind, umask, inp, tmp_path, capsys):
    """Weights (safetensors writes 0600), the VAE, configs and folders all get the modes the umask gives, so a
    folder one user converts another can load."""
    code, _, err = run(MAINS[kind], argv_of(base_options(kind, inp, tmp_path)), capsys)
    assert code == 0, err
    assert modes(tmp_path / "out") == umask_modes(umask)
    assert list((tmp_path / "out").rglob("*.safetensors"))


@pytest.mark.parametrize("umask", [0o022, 0o027], indirect=True, ids=["umask-022", "umask-027"])
def test_original_format_cache_entry_follows_the_umask(umask, inp, tmp_path, monkeypatch):
    monkeypatch.setenv("VISCPM_CACHE", str(tmp_path / "cache"))
    options = dict(llm_config=str(inp / "llm.json"), vision_config=str(inp / "vision.json"),
                   query_num=CHAT_QUERY_NUM, vocab_file=str(inp / "bee.txt"))
    entry = resolve_original_format(inp / "chat.pt", "chat", None, options)
    assert (entry / "config.json").is_file() and (entry / "model.safetensors").is_file()
    assert modes(entry) == umask_modes(umask)


# ---------------------------------------------------------------------------------------------- the Hub push


@pytest.fixture
def model(chat, tmp_path):
    """A converted tiny Chat folder at ``tmp_path/model`` (hard links to the session's folder)."""
    _hard_link_tree(chat[3], tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture(scope="module")
def clean_upload(chat):
    """The repo files a push of the untouched folder has."""
    return set(hub.prepare_upload(chat[3], "me/viscpm-chat-tiny").files)


def push_argv(mode, folder, tmp_path, repo_id="me/viscpm-chat-tiny"):
    extra = {"dry-run": ["--dry-run"], "stage": ["--stage-dir", tmp_path / "staged"], "push": []}[mode]
    return [folder, repo_id, *extra]


def _outside(tmp_path, name="secret.key", content="-----BEGIN PRIVATE KEY-----\n"):
    return _write(tmp_path / "outside" / name, content)


def _replace_with_link(path: Path, target: Path):
    shutil.move(path, target)
    path.symlink_to(target)


# (case id, what to do to the folder given (model, tmp_path), words of the error)
REFUSED_LINKS = [
    ("link-to-a-key-outside", lambda m, t: _link(m / "secret.key", _outside(t)),
     ["secret.key ->", "outside/secret.key (outside the folder)"]),
    ("link-to-a-system-file", lambda m, t: _link(m / "shadow", "/etc/shadow"),
     ["shadow -> /etc/shadow (outside the folder)"]),
    ("relative-link-escaping", lambda m, t: (_outside(t), _link(m / "notes.txt", "../outside/secret.key")),
     ["notes.txt ->", "(outside the folder)"]),
    ("nested-link-outside", lambda m, t: _link(m / "sub" / "deep" / "passwd", "/etc/passwd"),
     ["sub/deep/passwd -> /etc/passwd"]),
    ("link-to-a-folder-outside", lambda m, t: (_outside(t), _link(m / "extra", t / "outside")),
     ["extra ->", "(outside the folder)"]),
    ("weights-linked-from-elsewhere", lambda m, t: (
        (t / "blobs").mkdir(), _replace_with_link(m / "model.safetensors", t / "blobs" / "abc123")),
     ["model.safetensors ->", "blobs/abc123 (outside the folder)", "copy of what it points to"]),
    ("config-linked-from-elsewhere", lambda m, t: (
        (t / "elsewhere").mkdir(), _replace_with_link(m / "config.json", t / "elsewhere" / "config.json")),
     ["config.json ->", "(outside the folder)"]),
    ("dangling-link", lambda m, t: _link(m / "gone.bin", t / "nothing.bin"), ["gone.bin ->", "(points nowhere)"]),
    ("link-loop", lambda m, t: _link(m / "loop", "loop"), ["loop -> loop (points nowhere)"]),
    ("link-to-a-folder-inside", lambda m, t: (_write(m / "sub" / "a.txt", "a"), _link(m / "alias", m / "sub")),
     ["alias ->", "(a folder)"]),
]


@pytest.mark.parametrize("mode", ["dry-run", "stage", "push"])
@pytest.mark.parametrize(("case", "change", "words"), REFUSED_LINKS, ids=[case for case, *_ in REFUSED_LINKS])
def test_push_refuses_links_out_of_the_folder(case, change, words, mode, model, tmp_path, fake_api, capsys):
    change(model, tmp_path)
    before = snapshot(tmp_path)
    code, out, err = run(hub.main, push_argv(mode, model, tmp_path), capsys)
    assert code == 1
    assert_one_line_error(err, [*words, "a push will not follow", "only files inside the folder are uploaded"])
    assert out == [] and fake_api.log == []  # no HfApi was even created
    assert snapshot(tmp_path) == before  # nothing staged


BAD_REPO_IDS = ["me/ünï", "me/.hidden", "me/x.git", "me/" + "a" * 197, "a/b/c", "me/a--b", "me/", "me/x-", ""]


@pytest.mark.parametrize("mode", ["dry-run", "stage", "push"])
@pytest.mark.parametrize("repo_id", BAD_REPO_IDS, ids=["non-ascii", "hidden", "dot-git", "200-chars", "three-parts",
                                                      "double-dash", "empty-name", "trailing-dash", "empty"])
def test_push_refuses_repo_ids_the_hub_rejects(repo_id, mode, model, tmp_path, fake_api, capsys):
    before = snapshot(tmp_path)
    code, out, err = run(hub.main, push_argv(mode, model, tmp_path, repo_id), capsys)
    assert code == 1
    assert_one_line_error(err, [f"{repo_id!r} is not a Hub repo id", "expected NAME or OWNER/NAME"])
    assert out == [] and fake_api.log == [] and snapshot(tmp_path) == before


# (case id, extra arguments given (model, tmp_path), words of the error)
REFUSED_OPTIONS = [
    ("stage-inside-the-folder", lambda m, t: ["--stage-dir", m / "staged"], ["overlap", "outside it"]),
    ("stage-onto-the-folder", lambda m, t: ["--stage-dir", m, "--overwrite"], ["overlap"]),
    ("stage-onto-a-parent", lambda m, t: ["--stage-dir", t, "--overwrite"], ["overlap"]),
    ("stage-onto-a-file", lambda m, t: ["--stage-dir", _write(t / "staged.txt", "x")],
     ["staged.txt exists and is not a directory"]),
    ("stage-non-empty", lambda m, t: ["--stage-dir", _write(t / "full" / "x", "x").parent], ["--overwrite"]),
    ("source-checkpoint-typo", lambda m, t: ["--dry-run", "--source-checkpoint", t / "chat.ptt"],
     ["--source-checkpoint", "chat.ptt not found"]),
    ("folder-is-a-file", lambda m, t: None, ["is not a folder"]),
]


@pytest.mark.parametrize(("case", "extra", "words"), REFUSED_OPTIONS, ids=[case for case, *_ in REFUSED_OPTIONS])
def test_push_refuses_bad_options(case, extra, words, model, tmp_path, fake_api, capsys):
    args = extra(model, tmp_path)
    folder = model if args is not None else model / "config.json"
    before = snapshot(tmp_path)
    code, out, err = run(hub.main, [folder, "me/viscpm-chat-tiny", *(args or ["--dry-run"])], capsys)
    assert code == 1
    assert_one_line_error(err, words)
    assert out == [] and fake_api.log == [] and snapshot(tmp_path) == before


def _dotfiles(m, t):
    _write(m / ".env", "HF_TOKEN=hf_secret\n")
    _write(m / ".secrets" / "token", "hf_secret")
    _write(m / "sub" / ".npmrc", "//registry:_authToken=x")
    _write(m / ".git" / "config", "[core]")
    _link(m / ".ssh", t / "outside")  # hidden: left out without being followed


# (case id, change given (model, tmp_path), extra arguments, files added to the upload, words of the note or None)
ACCEPTED = [
    ("link-to-a-file-inside", lambda m, t: (_write(m / "notes.txt", "mine"), _link(m / "notes-link.txt", "notes.txt")),
     [], {"notes.txt": b"mine", "notes-link.txt": b"mine"}, None),
    ("dotfiles-left-out", _dotfiles, [], {}, ["not uploading 4 hidden file(s)/folder(s)", ".env", ".secrets",
                                              "sub/.npmrc", "--include-dotfiles"]),
    ("dotfiles-when-asked", lambda m, t: (_dotfiles(m, t), (m / ".ssh").unlink()), ["--include-dotfiles"],
     {".env": b"HF_TOKEN=hf_secret\n", ".secrets/token": b"hf_secret", "sub/.npmrc": b"//registry:_authToken=x"},
     None),
    ("folder-given-through-a-link", lambda m, t: None, [], {}, None),
]


@pytest.mark.parametrize("mode", ["stage", "push"])
@pytest.mark.parametrize(("case", "change", "extra", "added", "note"), ACCEPTED, ids=[case for case, *_ in ACCEPTED])
def test_push_uploads_exactly_the_folder(case, change, extra, added, note, mode, model, clean_upload, tmp_path,
                                         fake_api, capsys):
    change(model, tmp_path)
    folder = _link(tmp_path / "current", model) if case == "folder-given-through-a-link" else model
    before = snapshot(tmp_path)
    code, out, err = run(hub.main, [*push_argv(mode, folder, tmp_path), *extra], capsys)
    assert code == 0, err
    if note is None:
        assert err == []
    else:
        assert len(err) == 1 and err[0].startswith("note: "), err
        for word in note:
            assert word in err[0], (word, err[0])
    if mode == "stage":
        staged = tmp_path / "staged"
        uploaded = {p.relative_to(staged).as_posix(): p.read_bytes() for p in staged.rglob("*") if p.is_file()}
        assert not [p for p in staged.rglob("*") if p.is_symlink()]
        assert modes(staged) == umask_modes(current_umask())
        after = snapshot(tmp_path)
        assert {key: value for key, value in after.items() if not key.startswith("staged")} == before
        folders = {parent.as_posix() for name in uploaded for parent in Path(name).parents if parent != Path(".")}
        assert set(after) - set(before) == {"staged", *(f"staged/{name}" for name in {*uploaded, *folders})}
    else:
        (commit,) = calls(fake_api, "create_commit")
        uploaded = commit["files"]
        assert snapshot(tmp_path) == before
    assert set(uploaded) == clean_upload | set(added)
    for name, content in added.items():
        assert uploaded[name] == content
    assert not [name for name in uploaded if name.startswith(".git/") or "hf_secret" in name]
