#!/usr/bin/env python
"""Chat about an image with VisCPM-Chat: one question, a follow-up, and a streamed answer.

    python examples/chat.py --model openbmb/VisCPM-Chat --variant zhplus --image photo.jpg "这张图片里有什么？"
    python examples/chat.py --model viscpm-chat-hf --image photo.jpg "What is in the picture?"   # a converted folder

The first answer uses the original's decoding (beam search, the same answer as the original `chat()`); the
follow-up reuses the image features; the last answer is streamed with greedy search, as it is generated.
"""

import argparse

import torch
from PIL import Image

from viscpm import ChatSession, VisCPMChat


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default="这张图片里有什么？")
    parser.add_argument("--model", default="openbmb/VisCPM-Chat", help="a converted folder, a Hub repo or a .pt")
    parser.add_argument("--variant", help="for openbmb/VisCPM-Chat: v1.1, balance or zhplus")
    parser.add_argument("--image", required=True)
    parser.add_argument("--follow-up", default="What colours do you see?")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    chat = VisCPMChat.from_pretrained(args.model, variant=args.variant, dtype=dtype)
    image = Image.open(args.image)

    answer, context, vision = chat.chat(image, args.question, max_new_tokens=args.max_new_tokens)
    print(f"Q: {args.question}\nA: {answer}")
    answer, context, _ = chat.chat(image, args.follow_up, context=context, vision_hidden_states=vision,
                                   max_new_tokens=args.max_new_tokens)
    print(f"Q: {args.follow_up}\nA: {answer}")

    session = ChatSession(chat, image, original_beam_search=False, num_beams=1, max_new_tokens=args.max_new_tokens)
    print(f"Q: {args.question}\nA (greedy, streamed): ", end="", flush=True)
    for piece in session.stream(args.question):
        print(piece, end="", flush=True)
    print()
    return context


if __name__ == "__main__":
    main()
