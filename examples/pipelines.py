#!/usr/bin/env python
"""VisCPM through the ecosystem's own entry points: transformers' pipeline and Auto classes, diffusers'
DiffusionPipeline. `import viscpm` is all it takes to register the classes.

    python examples/pipelines.py --chat-model viscpm-chat-hf --paint-model viscpm-paint-hf --image photo.jpg
"""

import argparse

import torch
from diffusers import DiffusionPipeline
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

import viscpm  # noqa: F401  (registers the Auto classes and the diffusers pipeline)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chat-model", required=True, help="a converted VisCPM-Chat folder or Hub repo")
    parser.add_argument("--paint-model", required=True, help="a converted VisCPM-Paint folder or Hub repo")
    parser.add_argument("--image", required=True)
    parser.add_argument("--question", default="这张图片里有什么？")
    parser.add_argument("--prompt", default="海边的灯塔，油画风格")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args(argv)
    image = Image.open(args.image)

    # 1. The image-text-to-text pipeline: a question, then a conversation in the chat-message format.
    vqa = pipeline("image-text-to-text", model=args.chat_model)
    answer = vqa(images=image, text=args.question, return_full_text=False)[0]["generated_text"]
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": args.question}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                {"role": "user", "content": [{"type": "text", "text": "What colours do you see?"}]}]
    follow_up = vqa(text=messages, return_full_text=False)[0]["generated_text"]
    print(f"{args.question} -> {answer}\nWhat colours do you see? -> {follow_up}")

    # 2. The model and processor: generate() runs the original's decoding by default.
    model = AutoModelForImageTextToText.from_pretrained(args.chat_model)
    processor = AutoProcessor.from_pretrained(args.chat_model)
    inputs = processor(images=image, text=args.question, return_tensors="pt")
    generated = model.generate(**inputs)
    print(processor.post_process_image_text_to_text(generated[:, inputs["input_ids"].shape[1]:])[0])

    # 3. The diffusers pipeline.
    painter = DiffusionPipeline.from_pretrained(args.paint_model)
    picture = painter(args.prompt, num_inference_steps=args.steps, height=args.size, width=args.size,
                      generator=torch.Generator().manual_seed(0)).images[0]
    picture.save("pipeline-painting.png")
    return answer, follow_up, picture


if __name__ == "__main__":
    main()
