#!/usr/bin/env python
"""Adding the monitor to a TRL ``SFTTrainer`` script (LoRA): the marked lines are new.

    python examples/trl_sft.py --output_dir runs/sft --max_steps 40

TRL's ``SFTConfig`` turns on bf16 autocast and gradient checkpointing even on a CPU; the
monitor runs its probes in its own precision (``probe.precision``, fp32 by default) whatever the
trainer does, so its numbers do not depend on these settings.
"""

import random
import sys
from pathlib import Path

from datasets import Dataset
from peft import LoraConfig
from transformers import HfArgumentParser
from trl import SFTConfig, SFTTrainer

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from arena import snake_case_rows  # noqa: E402  (examples/arena.py: the demo's target task)

from arena_callbacks import ForgettingMonitor  # noqa: E402  NEW
from arena_callbacks.capabilities import build_capabilities  # noqa: E402  NEW
from arena_callbacks.models import load_model_and_tokenizer  # noqa: E402


def main():
    (args,) = HfArgumentParser(SFTConfig).parse_args_into_dataclasses()
    model, tok = load_model_and_tokenizer("smollm2-135m-instruct")
    train = Dataset.from_list(snake_case_rows(1000, random.Random(0)))  # prompt-completion rows
    monitor = ForgettingMonitor(  # NEW
        {"cadence": {"overhead_budget": 0.05},
         "budgets": [{"key": "delta_nll/general_text", "max_rise": 0.5, "action": "stop"}]},
        probes=build_capabilities(["general_text", "arithmetic"], n=24, tokenizer=tok),
        target=snake_case_rows(24, random.Random(1)),
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train, processing_class=tok,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
        callbacks=[monitor],  # NEW
    )
    trainer.train()
    trainer.save_model()


if __name__ == "__main__":
    main()
