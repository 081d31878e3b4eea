"""VisCPM-Paint's pipeline given careless or hostile arguments (issue 16): each ends in a clear error that names the
argument and the fix, before any work, or is handled correctly. Memory limits are checked in a child process whose
address space is capped: the limit must refuse the prompt before the text encoder allocates its quadratic tensors."""

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from paint_testing import EN, NEGATIVE, ZH

from conftest import PAINT_SIZE as SIZE

from viscpm import VisCPMPaintPipeline

NAN, INF = float("nan"), float("inf")
LONG = ", ".join([EN] * 12)  # about 120 tokens
LATENT = (1, 4, SIZE // 2, SIZE // 2)

CASES = [
    # prompts
    (dict(prompt=""), ValueError, "empty"),
    (dict(prompt=[EN, "   "]), ValueError, "prompt 1 is empty"),
    (dict(prompt=[]), ValueError, "empty list"),
    (dict(prompt=None), ValueError, "exactly one of"),
    (dict(prompt=3), TypeError, "str or a list"),
    (dict(negative_prompt=5), TypeError, r"`negative_prompt` must be a str or a list of str .*got int"),
    (dict(negative_prompt=[5]), TypeError, r"`negative_prompt` must be a str or a list of str"),
    (dict(prompt=[EN, ZH], negative_prompt=["x"]), ValueError, "1 negative prompts for 2"),
    (dict(prompt=EN, negative_prompt=NEGATIVE, negative_prompt_embeds=torch.zeros(1, 4, 16)), ValueError,
     "at most one of `negative_prompt` and `negative_prompt_embeds`"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 16)), ValueError, r"`prompt_embeds` must be a tensor \[batch, seq, dim\]"),
    (dict(prompt=None, prompt_embeds=torch.full((1, 4, 16), NAN)), ValueError, "`prompt_embeds` contains NaN or inf"),
    # sizes
    (dict(height=20), ValueError, "multiples of 8"),
    (dict(width=12), ValueError, "multiples of 8"),
    (dict(height=0), ValueError, r"positive multiples of 8 \(e\.g\. 512\), got height=0"),
    (dict(width=-16), ValueError, r"positive multiples of 8 \(e\.g\. 512\), got width=-16"),
    (dict(height=16.0), TypeError, "got height=16.0"),
    # steps and schedules
    (dict(num_inference_steps=0), ValueError, "at least 1"),
    (dict(num_inference_steps=2.5), TypeError, r"`num_inference_steps` must be an int \(e\.g\. 50\), got float 2\.5"),
    (dict(num_inference_steps="5"), TypeError, "`num_inference_steps` must be an int"),
    (dict(num_inference_steps=1000), ValueError,
     r"num_inference_steps=1000 gives DDPMScheduler timesteps up to 1000, beyond its 1000 training timesteps .*fewer steps"),
    (dict(num_inference_steps=5000), ValueError, r"`num_inference_steps`: 5000 cannot be larger than"),
    (dict(timesteps=[999, 500], sigmas=[1.0, 0.5]), ValueError, "Only one of `timesteps` or `sigmas`"),
    (dict(timesteps=[1200, 500]), ValueError, "`timesteps` must start before `self.config.train_timesteps`: 1000"),
    # guidance
    (dict(guidance_scale=NAN), ValueError, r"`guidance_scale` must be a finite number \(e\.g\. 7\.5.*got nan"),
    (dict(guidance_scale=INF), ValueError, "`guidance_scale` must be a finite number"),
    (dict(guidance_scale="7"), TypeError, "`guidance_scale` must be a number"),
    (dict(guidance_scale=1e30), ValueError, r"contain NaN or inf: guidance_scale=1e\+30 .*use a guidance_scale of about"),
    (dict(guidance_rescale=1.5), ValueError, r"`guidance_rescale` must be a finite number \(0 \(off\) to 1\)"),
    (dict(guidance_rescale=NAN), ValueError, "`guidance_rescale` must be a finite number"),
    (dict(eta=-1.0), ValueError, "`eta` must be a finite number"),
    # noise
    (dict(generator=5), TypeError, r"`generator` must be a torch\.Generator or a list of them .*got int"),
    (dict(generator=[5]), TypeError, r"`generator` must be a torch\.Generator"),
    (dict(num_images_per_prompt=2, generator=[torch.Generator()] * 3), ValueError, "3 generators"),
    (dict(latents=torch.full(LATENT, NAN)), ValueError, "`latents` contains NaN or inf"),
    (dict(latents=torch.full(LATENT, INF)), ValueError, "`latents` contains NaN or inf"),
    (dict(latents=[[0.0]]), TypeError, "`latents` must be a torch.Tensor"),
    (dict(latents=torch.zeros(2, 4, 8, 8)), ValueError, r"`latents` must have shape \(1, 4, 8, 8\)"),
    (dict(num_images_per_prompt=0), ValueError, "`num_images_per_prompt` must be at least 1"),
    (dict(num_images_per_prompt=1.5), TypeError, "`num_images_per_prompt` must be an int"),
    # the rest
    (dict(clip_skip=2), ValueError, "`clip_skip` must be below the text encoder's 2 layers"),
    (dict(clip_skip=-1), ValueError, "`clip_skip` must be at least 0"),
    (dict(cross_attention_kwargs="scale"), TypeError, "`cross_attention_kwargs` must be a dict"),
    (dict(output_type="jpg"), ValueError, "output_type"),
    (dict(callback_on_step_end_tensor_inputs=["noise"]), ValueError, "`callback_on_step_end_tensor_inputs` must be in"),
]


@pytest.mark.parametrize("kwargs, error, match", CASES, ids=[
    "empty", "blank-in-batch", "empty-list", "none", "int", "negative-int", "negative-list-int", "negatives",
    "negative-twice", "embeds-2d", "embeds-nan", "height", "width", "height-0", "width-negative", "height-float",
    "steps", "steps-float", "steps-str", "steps-1000", "steps-5000", "timesteps-and-sigmas", "timesteps-beyond",
    "guidance-nan", "guidance-inf", "guidance-str", "guidance-1e30", "rescale-1.5", "rescale-nan", "eta-negative",
    "generator-int", "generator-list-int", "generators", "latents-nan", "latents-inf", "latents-list",
    "latents-shape", "images-0", "images-float", "clip-skip-2", "clip-skip-negative", "cross-attention-str",
    "output-type", "callback-inputs"])
def test_bad_inputs_are_clear_errors(paint, kwargs, error, match):
    kwargs = {"prompt": EN, "height": SIZE, "width": SIZE, "num_inference_steps": 1, **kwargs}
    with pytest.raises(error, match=match):
        paint["pipe"](**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt=LONG), r"`prompt` is \d+ tokens, over max_prompt_length=64: shorten it"),
        (dict(prompt=[EN, LONG]), r"`prompt\[1\]` is \d+ tokens, over max_prompt_length=64"),
        (dict(prompt=EN, negative_prompt=LONG), r"`negative_prompt` is \d+ tokens, over max_prompt_length=64"),
        (dict(prompt=None, prompt_embeds=torch.zeros(1, 65, 16)), "`prompt_embeds` has 65 positions, over max_prompt_length=64"),
    ],
    ids=["prompt", "prompt-in-batch", "negative", "embeds"],
)
def test_prompt_length_limit(paint, kwargs, match):
    pipe = VisCPMPaintPipeline(**paint["pipe"].components, max_prompt_length=64)
    calls = []
    hook = pipe.text_encoder.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=match):
            pipe(**kwargs, height=SIZE, width=SIZE, num_inference_steps=1)
    finally:
        hook.remove()
    assert calls == []  # refused before the text encoder ran
    pipe(EN, height=SIZE, width=SIZE, num_inference_steps=1, output_type="latent")  # within the limit: drawn
    with pytest.raises(ValueError, match="`max_prompt_length` must be at least 1"):
        VisCPMPaintPipeline(**paint["pipe"].components, max_prompt_length=0)


_CHILD = """
import json, resource, sys
from viscpm import VisCPMPaintPipeline

pipe = VisCPMPaintPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
prompt = ("a red bicycle leaning on a brick wall, " * 700)[:25000]
with open("/proc/self/status") as status:
    size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, size + 2**30))  # 1 GiB beyond what is mapped now
outcomes = []
for limit in (3000, None):
    pipe.register_to_config(max_prompt_length=limit)
    try:
        pipe(prompt, height=16, width=16, num_inference_steps=1, output_type="latent")
        outcomes.append(["drawn", ""])
    except Exception as error:
        outcomes.append([type(error).__name__, str(error)[:300]])
print(json.dumps(outcomes))
"""


def test_long_prompt_is_refused_before_the_memory_is_taken(paint):
    """A 25,000-character prompt (5,784 tokens with bee.txt) with 1 GiB of address space to spare: with the default limit it is a
    ValueError naming the limit; without the limit the same call fails to allocate (the text encoder's position bias
    and segment relation grow with the square of the length), so the limit is what keeps it from the memory."""
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_CHILD), str(paint["root"] / "hf")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (kind, message), (unlimited_kind, unlimited_message) = json.loads(proc.stdout.strip().splitlines()[-1])
    refused = re.search(r"`prompt` is (\d+) tokens, over max_prompt_length=3000", message)
    assert kind == "ValueError" and refused and int(refused.group(1)) > 3000, message
    assert unlimited_kind in ("RuntimeError", "MemoryError") and "allocate" in unlimited_message, unlimited_message
