"""Full fine-tuning of VisCPM-Chat under DistributedDataParallel with gradient checkpointing (issue 13, item 9):
`torchrun --nproc-per-node 2` on CPU (gloo) trains a tiny model for two steps. DDP's default
(`find_unused_parameters=False`) fails a step when a trainable parameter gets no gradient, so finishing is the
check; the ranks must also end with identical weights, and the weights must have moved."""

import json
import subprocess
import sys
import textwrap

_SCRIPT = """
import copy, json, os, sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from viscpm import CpmBeeTokenizer, VisCPMChatConfig, VisCPMChatForConditionalGeneration

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
vocab_file, out_path = sys.argv[1:3]
query_num = 4
config = VisCPMChatConfig(
    vision_config=dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40, image_size=16,
                       patch_size=8, max_query_positions=8),
    text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, head_dim=8, intermediate_size=48,
                     position_bias_num_buckets=32, position_bias_num_segment_buckets=32, position_bias_max_distance=64,
                     rotary_dtype="float32"),
    query_num=query_num,
)
torch.manual_seed(0)
model = VisCPMChatForConditionalGeneration(config).train()
model.gradient_checkpointing_enable()
before = copy.deepcopy(model.state_dict())
ddp = DistributedDataParallel(model)
optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
tokenizer = CpmBeeTokenizer(vocab_file)
answers = [["一只猫", "a cat"], ["两只狗", "two dogs"]][rank]  # each rank trains on its own data
for step, answer in enumerate(answers):
    data = {"image": "<unk>" * query_num, "context": "", "question": "这是什么？", "<ans>": answer}
    inputs = tokenizer([data], return_tensors="pt", padding=True, return_labels=True)
    pixels = torch.randn((1, 3, 16, 16), generator=torch.Generator().manual_seed(10 * rank + step))
    loss = ddp(**inputs, pixel_values=pixels).loss
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    optimizer.step()
    optimizer.zero_grad()
flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(2)]
dist.all_gather(gathered, flat)
moved = [n for n, p in model.state_dict().items() if not torch.equal(p, before[n])]
if rank == 0:
    with open(out_path, "w") as handle:
        json.dump({"loss": float(loss), "missing": missing, "same": bool(torch.equal(gathered[0], gathered[1])),
                   "moved": len(moved), "trainable": sum(p.requires_grad for p in model.parameters())}, handle)
dist.barrier()  # both ranks are done before the group goes away (one closing early can abort the other's gloo)
dist.destroy_process_group()
# Leave without the interpreter's teardown: on a loaded machine gloo's threads can still abort it ("terminate
# called without an active exception"), after everything this test checks is done and written.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


def test_ddp_full_fine_tuning_with_gradient_checkpointing(tmp_path, vocab_file):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    out = tmp_path / "result.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
               vocab_file, str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["missing"] == [] and report["same"]
    assert report["loss"] == report["loss"] and report["loss"] > 0  # finite
    assert report["moved"] == report["trainable"]  # every trainable weight was updated, on both ranks alike
