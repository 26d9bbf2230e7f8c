#!/usr/bin/env python
"""Adding the monitor to a plain ``transformers.Trainer`` script: three lines are new (marked).

    python examples/trainer_script.py --model smollm2-135m-instruct --output_dir runs/trainer --max_steps 40

Any causal LM folder, .gguf file or (with network) hub id works as --model. The script is also
an ``accelerate launch`` target (see examples/accelerate_launch.sh): every argument of
``TrainingArguments`` is accepted on the command line.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import DataCollatorForSeq2Seq, HfArgumentParser, Trainer, TrainingArguments, set_seed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from arena_callbacks import ForgettingMonitor  # NEW (1/3)
from arena_callbacks.capabilities import build_capabilities
from arena_callbacks.models import load_model_and_tokenizer


@dataclass
class ScriptArguments:
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "model name, folder or .gguf"})
    monitor_config: str = field(default=str(Path(__file__).with_name("arena.yaml")))


def main():
    script, args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    # Seed before building the model: Trainer seeds only in its __init__, and anything random before
    # it (peft.get_peft_model's LoRA init, weights a checkpoint lacks) would differ on every run.
    set_seed(args.seed)
    model, tok = load_model_and_tokenizer(script.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    # Your data: here, answers in a new format (snake_case).
    import random

    from arena import snake_case_rows, tokenize_task  # examples/arena.py

    train = tokenize_task(snake_case_rows(1000, random.Random(0)), tok)

    monitor = ForgettingMonitor(  # NEW (2/3): held-out capabilities and a target probe
        script.monitor_config,
        probes=build_capabilities(["general_text", "python_code", "world_knowledge"], n=24, tokenizer=tok),
        target=snake_case_rows(24, random.Random(1)),
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=train, processing_class=tok,
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
        callbacks=[monitor],  # NEW (3/3)
    )
    trainer.train()
    trainer.save_model()
    print(f"history: {monitor.output_dir}/history.jsonl; report: arena-callbacks report {args.output_dir}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
