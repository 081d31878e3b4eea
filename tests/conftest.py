import pytest


@pytest.fixture(scope="session")
def vocab_file():
    """The CPM-Bee vocabulary, taken from the installed original package (never stored in this repo)."""
    from oracle import VOCAB_FILE

    return VOCAB_FILE


def load_script(name):
    """A script under conversion/ as a module (its `main(argv)` is what the command line runs)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "conversion" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHAT_QUERY_NUM = 64


@pytest.fixture(scope="session")
def chat_files(tmp_path_factory):
    """A tiny original VisCPM-Chat (`VLU_CPMBee`, random fp32 weights) and its checkpoint in the original format."""
    import json

    import torch
    from oracle import TINY_ORIGINAL_CONFIG, TINY_VISION_CONFIG, build_original_vlu

    root = tmp_path_factory.mktemp("chat")
    vlu = build_original_vlu(seed=0, query_num=CHAT_QUERY_NUM)
    checkpoint = root / "viscpm_chat.pt"
    torch.save(vlu.state_dict(), checkpoint)
    (root / "llm.json").write_text(json.dumps(TINY_ORIGINAL_CONFIG))
    (root / "vision.json").write_text(json.dumps(TINY_VISION_CONFIG))
    return vlu, root, checkpoint


@pytest.fixture(scope="session")
def chat(chat_files, vocab_file):
    """(original VLU_CPMBee, our model, our tokenizer, folder): converted by the script, loaded by Auto classes."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from viscpm import VisCPMChatForConditionalGeneration

    vlu, root, checkpoint = chat_files
    status = load_script("convert_viscpm_chat").main([
        "--checkpoint", str(checkpoint), "--output-dir", str(root / "hf"), "--llm-config", str(root / "llm.json"),
        "--vision-config", str(root / "vision.json"), "--query-num", str(CHAT_QUERY_NUM), "--vocab-file", vocab_file,
        "--no-progress",
    ])
    assert status == 0
    model = AutoModelForImageTextToText.from_pretrained(root / "hf", attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "hf")
    assert isinstance(model, VisCPMChatForConditionalGeneration)
    return vlu, model, tokenizer, root / "hf"
