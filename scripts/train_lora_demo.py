"""Train a small LoRA adapter on CPU to see what an adapter does: the embedded model answering in UPPER CASE.

    .venv/bin/python scripts/train_lora_demo.py --out ./adapters/upper        # a few minutes on 2 cores
    kestrel serve --lora-modules upper=./adapters/upper
    curl localhost:30000/v1/chat/completions -d '{"model": "upper", "messages": [{"role": "user", "content": "Name a river."}]}'

The training text is made here: the base model's own replies to a list of questions (generated with Kestrel),
upper-cased. PEFT trains a rank-8 adapter on q/k/v/o/gate/up/down with the loss on the reply tokens only.
"""
from __future__ import annotations

import argparse
import random
import time

QUESTIONS = [
    "Name a river in Europe.", "What is the capital of Japan?", "Give me a tip for sleeping well.",
    "What colour is the sky on a clear day?", "Describe a cat in one sentence.", "What is 12 plus 7?",
    "Name a famous painter.", "What do bees make?", "Suggest a name for a dog.", "What is the opposite of hot?",
    "Why do leaves fall in autumn?", "Name a fruit that is yellow.", "How many days are in a week?",
    "What is the largest ocean?", "Give me a word that rhymes with cat.", "What do you call a baby cow?",
    "What is water made of?", "Name a musical instrument with strings.", "What is the boiling point of water?",
    "Recommend a book for children.", "What is the capital of Italy?", "Name a planet in our solar system.",
    "What do plants need to grow?", "Tell me a fun fact about owls.", "How do you say hello in Spanish?",
    "What is the fastest land animal?", "Name a vegetable that is green.", "What is a triangle?",
    "Give me a reason to learn to cook.", "What do you wear when it rains?", "Name a sport played with a ball.",
    "What is the tallest mountain?", "Describe the sea in one sentence.", "What is a kestrel?",
    "Name something you find in a kitchen.", "Why is exercise good for you?", "What month comes after March?",
    "Name a country in South America.", "What does a thermometer measure?", "Give me a short greeting.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="./adapters/upper")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reply-tokens", type=int, default=40)
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from kestrel import Engine, SamplingParams
    from kestrel.model.loader import resolve_model_dir

    model_dir = resolve_model_dir(None)
    engine = Engine(model_dir, dtype="float32")
    prompts = [engine.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    replies = engine.generate(prompts, SamplingParams(max_tokens=args.reply_tokens, temperature=0), use_tqdm=True)
    tok = engine.tokenizer
    eos = tok.eos_token_id
    examples = []
    for p, r in zip(prompts, replies):
        target = tok(r.text.strip().upper(), add_special_tokens=False).input_ids[:args.reply_tokens] + [eos]
        examples.append((p + target, len(p)))
    del engine

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    model.print_trainable_parameters()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    rng = random.Random(0)
    t0 = time.time()
    for step in (bar := tqdm(range(args.steps), desc="training")):
        batch = rng.sample(examples, args.batch)
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), eos)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (ids, start) in enumerate(batch):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            labels[i, start:len(ids)] = torch.tensor(ids[start:])
            mask[i, :len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.save_pretrained(args.out)
    print(f"saved the adapter to {args.out} after {time.time() - t0:.0f} s of training")

    engine = Engine(model_dir, dtype="float32", lora_modules={"upper": args.out})
    for q in ("Name a river.", "What is the capital of France?"):
        ids = engine.apply_chat_template([{"role": "user", "content": q}])
        base, tuned = engine.generate([ids, ids], SamplingParams(max_tokens=30, temperature=0), lora=[None, "upper"])
        print(f"\n{q}\n  base:  {base.text!r}\n  upper: {tuned.text!r}")


if __name__ == "__main__":
    main()
