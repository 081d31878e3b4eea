"""Bad text and image inputs (issue 16): each ends in the exact error type with a message naming the cause and the
fix, or in the correct result. Image URLs are served by a local `http.server` on 127.0.0.1 (slow, 404, HTML, garbage,
a real PNG) and a closed port; the memory limit of CPM-Bee dicts is checked in a child process whose address space
is capped, so a large allocation would fail there instead of filling this machine.
"""

import http.server
import io
import os
import socket
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from viscpm.modeling.image_processing_viscpm import VisCPMImageProcessor
from viscpm.modeling.processing_viscpm_chat import VisCPMChatProcessor
from viscpm.modeling.tokenization_cpmbee import CpmBeeTokenizer


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tok(vocab_file):
    return CpmBeeTokenizer(vocab_file)


@pytest.fixture(scope="module")
def processor(tok):
    return VisCPMChatProcessor(VisCPMImageProcessor(), tok, query_num=4)


def _png(seed=0, size=(12, 9)) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


# ---------------------------------------------------------------------------------------------- image URLs


@pytest.fixture(scope="module")
def server():
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status, content_type, body):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/slow.png":  # accepts the connection, never answers (until the test ends)
                release.wait(30)
            elif self.path == "/image.png":
                self._send(200, "image/png", _png())
            elif self.path == "/page.html":
                self._send(200, "text/html; charset=utf-8", b"<html><body>not an image</body></html>")
            elif self.path == "/garbage.bin":
                self._send(200, "application/octet-stream", bytes(range(256)) * 4)
            else:
                self._send(404, "text/html", b"<h1>404</h1>")

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    with socket.socket() as sock:  # a port nothing listens on: connections are refused
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    try:
        yield {"base": f"http://127.0.0.1:{httpd.server_address[1]}", "closed": f"http://127.0.0.1:{closed_port}"}
    finally:
        release.set()
        httpd.shutdown()
        httpd.server_close()


URL_CASES = [
    # (path, error type, key words of the message: cause and fix)
    ("/slow.png", TimeoutError, ["did not answer within 0.5 s", "raise url_timeout"]),
    ("/missing.png", ValueError, ["answered HTTP 404", "check the URL"]),
    ("/page.html", ValueError, ["returned a text/html page", "not an image", "link the image file itself"]),
    ("/garbage.bin", ValueError, ["not an image file PIL can read", "pass a PNG, JPEG"]),
    ("closed", ConnectionError, ["cannot reach image URL", "check the address"]),
]


@pytest.mark.parametrize("path, error, words", URL_CASES, ids=[case[0] for case in URL_CASES])
def test_bad_image_urls(server, path, error, words):
    url = server["closed"] + "/image.png" if path == "closed" else server["base"] + path
    ip = VisCPMImageProcessor(url_timeout=0.5)
    with pytest.raises(error) as caught:
        ip(url)
    message = str(caught.value)
    assert url in message, message
    for word in words:
        assert word in message, message
    # The per-call option reaches the loading too, and a batch names the failing image.
    with pytest.raises(error, match=r"image 1: .*" + url.replace(".", r"\.")):
        VisCPMImageProcessor()([_png(), url], url_timeout=0.5)


def test_image_url_gives_the_file_pixels(server, processor):
    from_url = VisCPMImageProcessor()(server["base"] + "/image.png")["pixel_values"]
    assert torch.equal(from_url, VisCPMImageProcessor()(_png())["pixel_values"])
    messages = [{"role": "user", "content": [{"type": "image", "url": server["base"] + "/image.png"},
                                             {"type": "text", "text": "这是什么？"}]}]
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True)
    assert torch.equal(out["pixel_values"], processor(images=_png(), text="这是什么？")["pixel_values"])


# ---------------------------------------------------------------------------------------------- unusable objects


IMAGE_CASES = [
    # (image, error type, key words)
    (torch.empty(3, 8, 8, device="meta"), ValueError, ["meta device", "holds no pixel data", "pass a tensor"]),
    (torch.eye(8).to_sparse(), ValueError, ["sparse", "to_dense()"]),
    (torch.zeros(3, 8, 8, dtype=torch.complex64), ValueError, ["dtype torch.complex64", "uint8 or float"]),
    (np.empty((8, 8, 3), dtype=object), ValueError, ["unsupported dtype object"]),
    (np.zeros(()), ValueError, ["0 dimensions", "expected (H, W)"]),
    (np.full((4, 4, 3), np.inf, dtype=np.float32), ValueError, ["NaN or infinite"]),
    (np.full((4, 4), 70000, dtype=np.int32), ValueError, ["outside [0, 65535]", "8-bit or 16-bit"]),
    ({"pixels": [1, 2]}, ValueError, ["unsupported image type dict", "PIL image"]),
    (b"not an image", ValueError, ["not an image file PIL can read"]),
    (None, ValueError, ["no image given (None)", "pass a PIL image"]),
    ([np.zeros((4, 4, 3), np.uint8), None], ValueError, ["image 1: image is None"]),
]


@pytest.mark.parametrize("image, error, words", IMAGE_CASES, ids=[f"case{i}" for i in range(len(IMAGE_CASES))])
def test_unusable_images(image, error, words):
    with pytest.raises(error) as caught:
        VisCPMImageProcessor()(image)
    for word in words:
        assert word in str(caught.value), str(caught.value)


def test_usable_unusual_images():
    ip = VisCPMImageProcessor()
    reference = ip(np.full((6, 6, 3), 128, dtype=np.uint8))["pixel_values"]
    for image in (torch.full((3, 6, 6), 128, dtype=torch.uint8, requires_grad=False),
                  torch.full((3, 6, 6), 128 / 255, dtype=torch.float16),
                  torch.full((6, 6), 128 * 257, dtype=torch.int32).numpy().astype(np.uint16)):
        assert torch.equal(ip(image)["pixel_values"], reference)


# ---------------------------------------------------------------------------------------------- text and calls


CALL_CASES = [
    # (what, call, error type, key words)
    ("positional pair", lambda tok, p: tok("a", "b"), ValueError, ["text_pair is not supported", "one CPM-Bee dict"]),
    ("pair in a batch", lambda tok, p: tok([("a", "b")]), ValueError, ["text pairs are not supported"]),
    ("target", lambda tok, p: tok("a", text_target="b"), ValueError, ["text_target is not supported"]),
    ("dict offsets", lambda tok, p: tok({"a": "b"}, return_offsets_mapping=True), ValueError,
     ["return_offsets_mapping applies to plain text only"]),
    ("dict words", lambda tok, p: tok({"a": "b"}, is_split_into_words=True), ValueError,
     ["is_split_into_words applies to plain text only"]),
    ("dict unknown option", lambda tok, p: tok({"a": "b"}, bogus=1), TypeError, ["unsupported arguments", "bogus"]),
    ("dict tensors unpadded", lambda tok, p: tok([{"a": "b"}, {"a": "b c d e"}], return_tensors="pt"), ValueError,
     ["different lengths", "padding=True"]),
    ("bad padding side", lambda tok, p: tok({"a": "b"}, padding_side="middle"), ValueError, ["'left' or 'right'"]),
    ("number", lambda tok, p: tok(3.5), ValueError, ["must be a str or a CPM-Bee dict"]),
    ("unknown special", lambda tok, p: tok.tokenize("<nope_1>"), ValueError, ["unknown special token", "<<"]),
    ("too few segments", lambda tok, p: CpmBeeTokenizer(tok.vocab_file, max_segments=1), ValueError,
     ["max_segments must be at least 2"]),
    ("deep nesting", lambda tok, p: tok(_nested(5000)), ValueError, ["more than 1024 segments", "max_segments"]),
    ("processor video", lambda tok, p: p(text="q", videos=[np.zeros((2, 4, 4, 3))]), ValueError,
     ["does not take videos"]),
    ("processor unknown", lambda tok, p: p(text="q", bogus=1), TypeError, ["unsupported arguments: ['bogus']"]),
    ("processor offsets", lambda tok, p: p(text="q", return_text_replacement_offsets=True), ValueError,
     ["replaces no placeholder text"]),
    ("processor nothing", lambda tok, p: p(), ValueError, ["nothing to process"]),
    ("two images one item", lambda tok, p: p(images=[[_png(), _png(1)]], text=["q"]), ValueError,
     ["item 0: got 2 images", "one image per item"]),
    ("bad base64", lambda tok, p: p(text=[{"role": "user", "content": [{"type": "image", "base64": "%%%"},
                                                                       {"type": "text", "text": "q"}]}]),
     ValueError, ["not valid base64"]),
    ("tables per row", lambda tok, p: p.post_process_image_text_to_text([[1, 2]], ext_tables=[{}, {}]), ValueError,
     ["2 ext tables for 1 rows"]),
]


def _nested(depth: int) -> dict:
    root = node = {}
    for level in range(depth):
        node[f"k{level}"] = {}
        node = node[f"k{level}"]
    node["leaf"] = "x"
    return root


@pytest.mark.parametrize("what, call, error, words", CALL_CASES, ids=[case[0] for case in CALL_CASES])
def test_bad_text_inputs_and_calls(tok, processor, what, call, error, words):
    with pytest.raises(error) as caught:
        call(tok, processor)
    for word in words:
        assert word in str(caught.value), str(caught.value)


def test_segment_limit_holds_whole_dicts(tok):
    """Up to max_segments the dict is encoded (the original's relations); one segment more is refused."""
    fits = {f"k{i}": "v" for i in range(510)} | {"<ans>": ""}  # 1 + 2 * 511 = 1023 segments
    assert len(tok(fits)["segment_rel"]) == 1023
    with pytest.raises(ValueError, match="more than 1024 segments"):
        tok(fits | {"one more": "v"})
    roomy = CpmBeeTokenizer(tok.vocab_file, max_segments=2048)
    assert len(roomy(fits | {"one more": "v"})["segment_rel"]) == 1025


_LIMITED_CHILD = textwrap.dedent("""
    import importlib.util, resource, sys
    spec = importlib.util.spec_from_file_location("tok", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tok = module.CpmBeeTokenizer(sys.argv[2])
    data = {f"key {i}": "value" for i in range(20000)}
    data["<ans>"] = ""
    tok({"warm": "up"})
    with open("/proc/self/status") as status:
        used = next(int(line.split()[1]) for line in status if line.startswith("VmSize:")) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (used + (256 << 20), used + (256 << 20)))
    try:
        bytearray(1 << 30)
        print("limit not effective")
    except MemoryError:
        pass
    try:
        tok(data)
        print("encoded")
    except ValueError as error:
        print("refused:", error)
    except MemoryError:
        print("MemoryError")
    roomy = module.CpmBeeTokenizer(sys.argv[2], max_segments=10**6)
    try:
        roomy(data)
        print("roomy encoded")
    except MemoryError:
        print("roomy MemoryError")
""")


def test_huge_dict_is_refused_before_allocating(vocab_file):
    """A 20,000-key dict (40,002 segments: a 1.6e9-entry relation table) is refused by the segment limit in a process
    that cannot allocate 256 MB more; with the limit lifted the same call runs out of memory there."""
    result = subprocess.run(
        [sys.executable, "-c", _LIMITED_CHILD, os.path.join(ROOT, "modeling", "tokenization_cpmbee.py"), vocab_file],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stderr[-2000:]
    assert "limit not effective" not in lines
    assert lines[0].startswith("refused: the CPM-Bee dict has more than 1024 segments"), lines
    assert "raise tokenizer.max_segments" in lines[0]
    assert lines[1] == "roomy MemoryError", lines
