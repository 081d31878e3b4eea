"""What the shared fixtures take from the original VisCPM: the CPM-Bee vocabulary and tiny checkpoints in the
original format; from the original package when it is installed, else stand-ins of the same format.

With the original installed (CI), everything comes from it, as the parity tests need: its bee.txt, and tiny original
models built by tests/oracle.py, returned with their checkpoints so that the parity tests compare with them. Without
it (``pytest -m "not oracle"`` where VisCPM, torchscale and fairscale are missing), the same kind of inputs are built
here, and the builders return a `Missing` in place of the original model:

* a vocabulary in bee.txt's format: its 86,583 lines, its special tokens at their ids (``<pad>`` 0 to ``<option>``
  10, ``<`` 40, ``<eod>`` 65756), printable ASCII, CJK characters and punctuation, and two-character CJK words;
* checkpoints under the original key names and shapes, written from the project's own classes as `viscpm demo`
  writes them (viscpm/apps/demo.py), with random weights on the scales tests/oracle.py draws.

An oracle test (tests/test_oracle_split.py) checks the stand-ins against the original's files.
"""

import atexit
import functools
import importlib.util
import shutil
import tempfile
from pathlib import Path

import without_original

TINY_ORIGINAL_CONFIG = dict(  # the original CPM-Bee config keys of the tiny CPM-Bee every test layer uses
    vocab_size=86583,
    dim_model=32,
    num_heads=4,
    dim_head=8,
    dim_ff=48,
    num_layers=2,
    dropout_p=0.0,
    position_bias_num_buckets=32,
    position_bias_num_segment_buckets=32,
    position_bias_max_distance=64,
    eps=1e-6,
    half=False,
)

TINY_VISION_CONFIG = dict(  # torchscale EncoderConfig keys of the tiny BEiT-3 of VisCPM-Chat
    encoder_embed_dim=24,
    encoder_layers=2,
    encoder_attention_heads=4,
    encoder_ffn_embed_dim=40,
    img_size=32,
    patch_size=8,
    vocab_size=100,
)


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


HAVE_ORIGINAL = all(_installed(package) for package in without_original.ORIGINAL_PACKAGES)
"""Whether the original can be imported (decided once, when conftest.py imports this module)."""


class Missing:
    """Stands for an original model where the original is not installed: any use of it says why it fails."""

    def __init__(self, what: str):
        self._what = what

    def __getattr__(self, name):
        raise RuntimeError(f"{self._what} needs the original VisCPM, which is not installed: a test that uses it is an "
                           "oracle test (mark it pytest.mark.oracle, see tests/conftest.py)")


# -- the vocabulary -------------------------------------------------------------------------------------------------

VOCAB_SIZE = TINY_ORIGINAL_CONFIG["vocab_size"]
SPECIAL_IDS = {"<pad>": 0, "<unk>": 1, "<mask>": 2, "<sep>": 3, "</n>": 4, "</_>": 5, "<s>": 6, "</s>": 7,
               "<root>": 8, "<ans>": 9, "<option>": 10, "<": 40, "<eod>": 65756}
"""bee.txt's special tokens and their ids (`<`, the escape character, among them)."""
_CHARACTER_RANGES = ((0x2010, 0x2028), (0x3001, 0x3040), (0xFF01, 0xFF5F), (0x4E00, 0xA000))
"""General punctuation, CJK symbols and punctuation, full-width forms, CJK unified ideographs."""


def stand_in_vocab() -> list[str]:
    """The lines of a vocabulary in bee.txt's format (see the module docstring)."""
    printable = []  # bee.txt's printable ASCII in code order, with its pieces "..", "..." and "__"
    for code in range(0x21, 0x7F):
        printable += {".": [".", "..", "..."], "_": ["_", "__"]}.get(chr(code), [chr(code)])
    pieces = [piece for piece in printable if piece not in SPECIAL_IDS]
    pieces += [chr(code) for start, stop in _CHARACTER_RANGES for code in range(start, stop)]
    lines = [None] * VOCAB_SIZE
    for token, index in SPECIAL_IDS.items():
        lines[index] = token
    free = iter([index for index, line in enumerate(lines) if line is None])
    for piece, index in zip(pieces, free):
        lines[index] = piece
    start, stop = _CHARACTER_RANGES[-1]
    for number, index in enumerate(free):  # two-character words, as most of bee.txt, ending in a rare character
        row, column = divmod(number, stop - start)
        lines[index] = chr(start + column) + chr(stop - 1 - row)
    return lines


@functools.cache
def vocab_file() -> str:
    """The CPM-Bee vocabulary: the original package's bee.txt, or a stand-in in a temporary folder."""
    if HAVE_ORIGINAL:
        with without_original.lifted():
            from oracle import VOCAB_FILE
        return VOCAB_FILE
    folder = Path(tempfile.mkdtemp(prefix="cpmbee-vocab-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = folder / "bee.txt"
    path.write_text("\n".join(stand_in_vocab()) + "\n", encoding="utf-8")
    return str(path)


# -- checkpoints in the original format -----------------------------------------------------------------------------


def _draw(model, seed: int, cpmbee_prefix: str) -> None:
    """Random weights on tests/oracle.py's scales: norms 1 + N(0, 0.1^2) (their biases N(0, 0.1^2)), other biases
    N(0, 0.1^2), CPM-Bee's matrices N(0, 1) (its layers scale by 1/sqrt(dim) themselves), the rest N(0, 0.3^2)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            module_name, _, kind = name.rpartition(".")
            noise = torch.randn(param.shape, generator=generator)
            if "Norm" in type(model.get_submodule(module_name)).__name__:
                param.copy_(1.0 + 0.1 * noise if kind == "weight" else 0.1 * noise)
            elif kind == "bias":
                param.copy_(0.1 * noise)
            else:
                param.copy_(noise if name.startswith(cpmbee_prefix) else 0.3 * noise)


def _guarded(original):
    """``original``, whose class is refused to tests not marked `oracle` (tests/without_original.py)."""
    without_original.GUARDED.add(type(original))
    return original


def _detached(state: dict) -> dict:
    return {key: tensor.detach().clone() for key, tensor in state.items()}


def cpmbee_checkpoint(seed: int = 0):
    """(original `CPMBeeTorch` or a `Missing`, its state dict): the tiny CPM-Bee of TINY_ORIGINAL_CONFIG."""
    if not HAVE_ORIGINAL:
        return Missing("the original CPM-Bee"), stand_in_cpmbee_state(seed)
    with without_original.lifted():
        from oracle import build_original_cpmbee

        original = build_original_cpmbee(seed=seed)
    return _guarded(original), _detached(original.state_dict())


def chat_checkpoint(seed: int = 0, query_num: int = 64):
    """(original `VLU_CPMBee` or a `Missing`, its state dict): the tiny VisCPM-Chat of TINY_ORIGINAL_CONFIG and
    TINY_VISION_CONFIG with ``query_num`` image slots."""
    if not HAVE_ORIGINAL:
        return Missing("the original VisCPM-Chat"), stand_in_chat_state(seed, query_num)
    with without_original.lifted():
        from oracle import build_original_vlu

        original = build_original_vlu(seed=seed, query_num=query_num)
    return _guarded(original), _detached(original.state_dict())


def paint_checkpoint(unet, vae, scheduler, seed: int = 0):
    """(original `VisCPMPaint` around ``unet``, ``vae`` and ``scheduler``, or a `Missing`; its state dict): the tiny
    CPM-Bee of TINY_ORIGINAL_CONFIG, the bridge to ``unet``'s cross-attention width, and ``unet``."""
    if not HAVE_ORIGINAL:
        return Missing("the original VisCPM-Paint"), stand_in_paint_state(unet, seed)
    with without_original.lifted():
        from oracle import build_original_cpmbee, build_original_paint, original_paint_state_dict

        original = build_original_paint(build_original_cpmbee(seed=seed), unet, vae, scheduler)
        state = original_paint_state_dict(original)
    return _guarded(original), _detached(state)


def stand_in_cpmbee_state(seed: int = 0) -> dict:
    """A state dict in the original CPM-Bee's format, drawn by our `CpmBeeModel`."""
    from viscpm.conversion.convert_cpmbee import CPMBEE_KEYS, load_cpmbee_config
    from viscpm.modeling import CpmBeeModel

    model = CpmBeeModel(load_cpmbee_config(dict(TINY_ORIGINAL_CONFIG))).eval()
    _draw(model, seed, cpmbee_prefix="")
    return _detached({CPMBEE_KEYS.to_original(key): tensor for key, tensor in model.state_dict().items()})


def stand_in_chat_state(seed: int = 0, query_num: int = 64) -> dict:
    """A state dict in the original `VLU_CPMBee`'s format, drawn by our `VisCPMChatForConditionalGeneration`."""
    from viscpm.apps.demo import original_chat_state_dict
    from viscpm.conversion.convert_viscpm_chat import build_chat_config
    from viscpm.modeling import VisCPMChatForConditionalGeneration

    config = build_chat_config(dict(TINY_ORIGINAL_CONFIG), dict(TINY_VISION_CONFIG), query_num)
    model = VisCPMChatForConditionalGeneration(config).eval()
    _draw(model, seed, cpmbee_prefix="language_model.")
    return original_chat_state_dict(model)


def stand_in_paint_state(unet, seed: int = 0) -> dict:
    """A state dict in the original `VisCPMPaint`'s format: our `VisCPMPaintTextEncoder`'s weights and ``unet``'s."""
    from viscpm.apps.demo import original_paint_state_dict
    from viscpm.conversion.convert_cpmbee import load_cpmbee_config
    from viscpm.modeling import VisCPMPaintTextEncoder, VisCPMPaintTextEncoderConfig

    config = VisCPMPaintTextEncoderConfig(text_config=load_cpmbee_config(dict(TINY_ORIGINAL_CONFIG)),
                                          projection_dim=unet.config.cross_attention_dim)
    text_encoder = VisCPMPaintTextEncoder(config).eval()
    _draw(text_encoder, seed, cpmbee_prefix="model.")
    return original_paint_state_dict(text_encoder, unet)
