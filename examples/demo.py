#!/usr/bin/env python
"""End-to-end demo of arena-callbacks: watch a finetune forget, and stop it on a budget.

Offline and CPU-only. Steps:

1. Build a small Llama from a config and a byte-level BPE tokenizer trained here on real
   English text from the standard library (``pydoc_data.topics``) and some stdlib source code.
2. "Pretrain" it briefly on that text and code, so it has general abilities to lose. The
   result is cached in ``.cache/demo-base/`` (``.cache/demo-base-quick/`` for ``--quick``),
   so reruns skip this.
3. Build held-out capability probes (``general``: pydoc passages not trained on; ``code``:
   chunks of stdlib modules not trained on) and a target task as ``completion`` probes and
   training data: ``kind`` (default; answer whether a snippet is Python code or English
   prose) or ``reverse`` (reverse 3-4 words; this tiny model needs 100+ steps for it).
4. Finetune on the target with ``transformers.Trainer`` at a learning rate high enough that
   the general text NLL keeps rising after the task is learned, with ``ForgettingMonitor``
   attached and TensorBoard on. The budget in ``examples/monitor.yaml`` stops the run
   before ``--max-steps``.
5. Print a short summary: baseline vs final retention, plasticity, the stop message and where
   the outputs are.

Usage::

    python examples/demo.py                 # full demo (about 1-3 minutes on 2 cores)
    python examples/demo.py --quick         # smoke test (well under a minute)
    python examples/demo.py --output-dir runs/try2 --max-steps 300 --seed 1

Offline by construction: ``HF_HUB_OFFLINE=1`` is set before transformers is imported, and
nothing is loaded by name from a hub.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Nothing is ever loaded from a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent

try:
    import arena_callbacks  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from arena_callbacks import ForgettingMonitor, MonitorConfig  # noqa: E402

# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseSettings:
    """Everything that shapes the cached pretrained model (its cache key)."""

    vocab_size: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    seq_len: int
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    code_files: int  # how many stdlib modules go into pretraining
    tie: bool = True
    seed: int = 0


@dataclass(frozen=True)
class RunSettings:
    max_steps: int
    batch_size: int
    learning_rate: float
    probe_every: int | None
    n_general: int
    n_code: int
    n_target: int


FULL_BASE = BaseSettings(
    vocab_size=1024, hidden=96, layers=4, heads=4, intermediate=256, seq_len=128,
    pretrain_steps=400, pretrain_lr=3e-3, pretrain_batch=16, code_files=24,
)
QUICK_BASE = BaseSettings(
    vocab_size=1024, hidden=64, layers=2, heads=4, intermediate=128, seq_len=64,
    pretrain_steps=300, pretrain_batch=16, pretrain_lr=3e-3, code_files=12,
)
# probe_every=None: the cadence of the config file (examples/monitor.yaml) applies.
FULL_RUN = RunSettings(max_steps=200, batch_size=16, learning_rate=3e-4, probe_every=None,
                       n_general=32, n_code=32, n_target=32)
QUICK_RUN = RunSettings(max_steps=60, batch_size=16, learning_rate=1e-3, probe_every=5,
                        n_general=16, n_code=16, n_target=16)

# Stdlib modules: the first ones are trained on (as many as BaseSettings.code_files); the
# held-out ones are the code probe and never trained on. Missing files are skipped.
TRAIN_MODULES = (
    "textwrap.py", "string.py", "glob.py", "shlex.py", "heapq.py", "copy.py", "fnmatch.py",
    "keyword.py", "numbers.py", "pprint.py", "reprlib.py", "sched.py", "secrets.py", "stat.py",
    "tabnanny.py", "token.py", "abc.py", "bisect.py", "calendar.py", "cmd.py", "codeop.py",
    "contextvars.py", "filecmp.py", "fileinput.py", "getopt.py", "gettext.py", "graphlib.py",
    "linecache.py", "nturl2path.py", "opcode.py", "operator.py", "queue.py",
)
HELDOUT_MODULES = ("colorsys.py", "netrc.py", "shelve.py", "statistics.py", "random.py", "difflib.py")

# Words of the target task (reverse the words).
TASK_WORDS = (
    "red green blue black white apple river stone cloud music paper light table window "
    "garden summer winter bread water forest"
).split()


# --------------------------------------------------------------------------------------
# Data: real English text and code from the standard library
# --------------------------------------------------------------------------------------


def _passages(text: str, max_chars: int) -> list[str]:
    """Split a document into passages of whole paragraphs, each at most ~max_chars long."""
    out: list[str] = []
    cur = ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        if cur and len(cur) + len(para) + 2 > max_chars:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
        while len(cur) > max_chars * 2:  # one very long paragraph: cut at a line break
            cut = cur.rfind("\n", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            out.append(cur[:cut])
            cur = cur[cut:].lstrip("\n")
    if cur.strip():
        out.append(cur)
    return [p for p in out if len(p.strip()) >= 80]


def _code_chunks(source: str, lines_per_chunk: int) -> list[str]:
    lines = source.splitlines()
    chunks = ["\n".join(lines[i : i + lines_per_chunk]) for i in range(0, len(lines), lines_per_chunk)]
    return [c for c in chunks if len(c.strip()) >= 80]


def general_documents() -> tuple[list[str], list[str]]:
    """pydoc topics split into (train passages, held-out passages) by topic: no topic is in both."""
    from pydoc_data.topics import topics

    train, held = [], []
    for i, key in enumerate(sorted(topics)):
        (held if i % 6 == 3 else train).extend(_passages(topics[key], 600))
    return train, held


def code_documents(n_train_files: int) -> tuple[list[str], list[str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])

    def read(names):
        out = []
        for name in names:
            path = stdlib / name
            if path.is_file():
                out.append(path.read_text(encoding="utf-8", errors="replace"))
        return out

    train = [c for src in read(TRAIN_MODULES[:n_train_files]) for c in _code_chunks(src, 24)]
    held = [c for src in read(HELDOUT_MODULES) for c in _code_chunks(src, 16)]
    return train, held


def reverse_examples(n: int, rng: random.Random, exclude: set[str] = frozenset()) -> list[dict[str, str]]:
    """Task ``reverse``: reverse a list of 3-4 words."""
    rows, seen = [], set(exclude)
    while len(rows) < n:
        words = rng.sample(TASK_WORDS, rng.randint(3, 4))
        prompt = "Reverse the words: " + " ".join(words) + "\nReversed:"
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "completion": " " + " ".join(reversed(words))})
    return rows


def _snippet(doc: str, rng: random.Random, code: bool) -> str | None:
    """A short piece of a document: 2-3 non-empty lines of code, or about a sentence of prose."""
    if code:
        lines = [ln for ln in doc.splitlines() if ln.strip()]
        if len(lines) < 3:
            return None
        i = rng.randrange(len(lines) - 2)
        return "\n".join(lines[i : i + rng.randint(2, 3)])
    words = " ".join(doc.split()).split(" ")
    if len(words) < 12:
        return None
    i = rng.randrange(len(words) - 10)
    return " ".join(words[i : i + rng.randint(10, 16)])


def kind_examples(n: int, rng: random.Random, text_docs: list[str], code_docs: list[str]) -> list[dict[str, str]]:
    """Task ``kind``: say whether a snippet is Python code or English prose (half each)."""
    rows: list[dict[str, str]] = []
    while len(rows) < n:
        code = len(rows) % 2 == 1
        snip = _snippet(rng.choice(code_docs if code else text_docs), rng, code)
        if snip:
            rows.append({"prompt": f"Is this Python code or English prose?\n{snip}\nAnswer:",
                         "completion": " code" if code else " prose"})
    return rows


# --------------------------------------------------------------------------------------
# The base model: tokenizer + small Llama, briefly pretrained, cached
# --------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def new_model(s: BaseSettings, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(s.seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        max_position_embeddings=512,
        tie_word_embeddings=s.tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


def pretrain(model, tokenizer, docs: list[str], s: BaseSettings) -> float:
    """Next-token training on random windows of the packed documents. Returns the last loss."""
    stream: list[int] = []
    for ids in tokenizer(docs, add_special_tokens=True)["input_ids"]:
        stream.extend(ids + [tokenizer.eos_token_id])
    data = torch.tensor(stream, dtype=torch.long)
    g = torch.Generator().manual_seed(s.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=s.pretrain_lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, s.pretrain_steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, s.pretrain_steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    ema = None
    start = time.perf_counter()
    for step in range(s.pretrain_steps):
        idx = torch.randint(0, len(data) - s.seq_len - 1, (s.pretrain_batch,), generator=g)
        batch = torch.stack([data[i : i + s.seq_len] for i in idx.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if (step + 1) % max(1, s.pretrain_steps // 5) == 0:
            print(f"  pretrain step {step + 1:4d}/{s.pretrain_steps}  loss {ema:.3f}  "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
    return float(ema)


def base_model(s: BaseSettings, cache_dir: Path):
    """The pretrained base model and tokenizer, from the cache or built now."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    text_train, _ = general_documents()
    code_train, _ = code_documents(s.code_files)
    docs = text_train + code_train
    # The cache is keyed on the settings and on the training text (which follows the Python version).
    key = hashlib.sha256(json.dumps({"settings": asdict(s), "docs": docs, "v": 1}).encode()).hexdigest()[:16]
    meta_path = cache_dir / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("key") == key:
                tok = AutoTokenizer.from_pretrained(cache_dir)
                model = LlamaForCausalLM.from_pretrained(cache_dir).eval()
                print(f"Base model: loaded from {_rel(cache_dir)} (pretraining loss {meta['loss']:.2f})")
                return model, tok
            print(f"Base model cache in {_rel(cache_dir)} was built with other settings; rebuilding it")
        except Exception as e:  # a broken cache is rebuilt
            print(f"Base model cache in {_rel(cache_dir)} is unreadable ({e}); rebuilding it")
    print(f"Base model: pretraining a small Llama on stdlib text and code (cached in {_rel(cache_dir)}) ...")
    start = time.perf_counter()
    tok = train_tokenizer(docs, s.vocab_size)
    model = new_model(s, len(tok))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"  {n_params / 1e6:.2f}M parameters, {len(tok)} tokens in the vocabulary, "
          f"{len(text_train)} text + {len(code_train)} code passages")
    loss = pretrain(model, tok, docs, s)
    model.eval()
    # Write next to the cache and rename, so that an interrupted run leaves no half cache.
    tmp = cache_dir.with_name(f"{cache_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "meta.json").write_text(json.dumps({"key": key, "loss": loss, "settings": asdict(s)}, indent=2))
    shutil.rmtree(cache_dir, ignore_errors=True)
    tmp.rename(cache_dir)
    print(f"  done in {time.perf_counter() - start:.0f}s")
    return model, tok


# --------------------------------------------------------------------------------------
# Finetuning with the monitor attached
# --------------------------------------------------------------------------------------


def build_probes(run: RunSettings, base: BaseSettings, task: str, seed: int):
    rng = random.Random(1234)  # probes are fixed whatever --seed says
    text_train, text_held = general_documents()
    code_train, code_held = code_documents(base.code_files)
    general = [{"text": t} for t in rng.sample(text_held, min(run.n_general, len(text_held)))]
    code = [{"text": c} for c in rng.sample(code_held, min(run.n_code, len(code_held)))]
    if task == "reverse":
        target = reverse_examples(run.n_target, rng)
        train = reverse_examples(2000, random.Random(seed), exclude={r["prompt"] for r in target})
    else:
        # Target rows come from documents the finetuning never sees (nor the capability probes).
        t_docs, c_docs = text_train[::10], code_train[::10]
        target = kind_examples(run.n_target, rng, t_docs, c_docs)
        train_text = [d for i, d in enumerate(text_train) if i % 10]
        train_code = [d for i, d in enumerate(code_train) if i % 10]
        train = kind_examples(2000, random.Random(seed), train_text, train_code)
    return {"general": general, "code": code}, target, train


def tokenize_task(rows: list[dict[str, str]], tok) -> list[dict[str, list[int]]]:
    """Prompt + completion + EOS; the loss is on the completion and EOS only."""
    out = []
    for r in rows:
        p = tok(r["prompt"])["input_ids"]
        ids = tok(r["prompt"] + r["completion"])["input_ids"] + [tok.eos_token_id]
        out.append({"input_ids": ids, "labels": [-100] * len(p) + ids[len(p) :]})
    return out


def _rel(p: Path | str) -> str:
    p = Path(p).resolve()
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


TASK_LABELS = {"kind": "code or prose?", "reverse": "reverse the words"}


def probe_printer():
    """A callback that prints one compact line per probe step (the monitor logs through Trainer.log)."""
    from transformers import TrainerCallback

    class ProbePrinter(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "nll/general" not in logs:
                return
            print(
                f"  step {state.global_step:4d} | "
                f"general NLL {logs['nll/general']:.3f} ({logs['delta_nll/general']:+.3f}) | "
                f"code NLL {logs['nll/code']:.3f} ({logs['delta_nll/code']:+.3f}) | "
                f"target exact match {logs['target/score']:.2f}, NLL {logs['target/nll']:.3f}",
                flush=True,
            )

    return ProbePrinter()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Finetune a small pretrained model until it forgets, and let ForgettingMonitor stop it."
    )
    ap.add_argument("--output-dir", default="runs/demo", help="trainer output folder (default: runs/demo)")
    ap.add_argument("--max-steps", type=int, default=None,
                    help=f"most finetuning steps (default: {FULL_RUN.max_steps}; {QUICK_RUN.max_steps} with --quick)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the finetuning run (default: 0)")
    ap.add_argument("--quick", action="store_true", help="a much smaller model and run, for a smoke test")
    ap.add_argument("--task", choices=sorted(TASK_LABELS), default="kind", help="target task (default: kind)")
    ap.add_argument("--learning-rate", type=float, default=None,
                    help=f"finetuning learning rate (default: {FULL_RUN.learning_rate:g}; "
                         f"{QUICK_RUN.learning_rate:g} with --quick)")
    ap.add_argument("--config", default=str(HERE / "monitor.yaml"),
                    help="monitor config (default: examples/monitor.yaml)")
    ap.add_argument("--cache-dir", default=None,
                    help="where the pretrained base is cached (default: .cache/demo-base, or .cache/demo-base-quick)")
    args = ap.parse_args(argv)
    if args.max_steps is not None and args.max_steps < 1:
        ap.error("--max-steps must be at least 1")

    t0 = time.perf_counter()
    logging.basicConfig(format="  %(message)s", level=logging.WARNING, stream=sys.stdout)
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 4)))
    torch.set_flush_denormal(True)  # denormal floats make CPU training 10-40x slower
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    base_s = QUICK_BASE if args.quick else FULL_BASE
    run = QUICK_RUN if args.quick else FULL_RUN
    max_steps = args.max_steps or run.max_steps
    lr = args.learning_rate or run.learning_rate
    default_cache = "demo-base-quick" if args.quick else "demo-base"
    cache_dir = Path(args.cache_dir) if args.cache_dir else REPO / ".cache" / default_cache
    out = Path(args.output_dir)
    for sub in ("arena", "runs"):  # this demo's outputs from an earlier run into the same folder
        shutil.rmtree(out / sub, ignore_errors=True)

    model, tok = base_model(base_s, cache_dir)
    probes, target, train_rows = build_probes(run, base_s, args.task, args.seed)

    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainingArguments

    config = MonitorConfig.from_file(args.config)
    if run.probe_every is not None:  # --quick probes more often than the config file says
        cadence = config.cadence.model_copy(update={"every_n_steps": run.probe_every})
        config = config.model_copy(update={"cadence": cadence})
    # ---- the one line a finetuning script adds (plus callbacks=[monitor] below) ----
    monitor = ForgettingMonitor(config, probes=probes, target=target)

    targs = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=run.batch_size,
        learning_rate=lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=5,
        report_to=["tensorboard"],
        save_strategy="no",
        use_cpu=True,
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=tokenize_task(train_rows, tok),
        processing_class=tok,
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
        callbacks=[monitor, probe_printer()],
    )
    trainer.remove_callback(PrinterCallback)  # the printer above replaces the raw log dicts

    budgets = "; ".join(
        f"{b.key} {b.limit[0]} {b.limit[1]:g} (patience {b.patience}, {b.action.value})" for b in config.budgets
    )
    print(f"\nFinetuning on the target task ({TASK_LABELS[args.task]}) for at most {max_steps} steps at "
          f"lr {lr:g}, probing every {config.cadence.every_n_steps} steps.\nBudgets: {budgets or 'none'}")
    t_ft = time.perf_counter()
    trainer.train()
    ft_seconds = time.perf_counter() - t_ft

    from arena_callbacks.tensorboard import resolve_tensorboard_dir

    tb_dir = resolve_tensorboard_dir(config.logging.tensorboard_dir, trainer, str(out))
    print_summary(monitor, args.task, tb_dir, max_steps, ft_seconds, time.perf_counter() - t0)
    return 0


def print_summary(
    monitor: ForgettingMonitor, task: str, tb_dir: str, max_steps: int, ft_s: float, total_s: float
) -> None:
    snaps = monitor.history.snapshots
    base, final = snaps[0].metrics, snaps[-1].metrics
    arena = monitor.output_dir

    def row(label: str, key: str, note: str = "") -> None:
        b, f = base.get(key, math.nan), final.get(key, math.nan)
        print(f"  {label:<40s}{b:>9.3f}{f:>12.3f}{note}")

    print("\n" + "=" * 76)
    print(f"Summary (finetuning {ft_s:.0f}s, whole demo {total_s:.0f}s)")
    print("=" * 76)
    print(f"  {'':<40s}{'step 0':>9s}{f'step {snaps[-1].step}':>12s}")
    for name in ("general", "code"):
        nll = f"   (NLL {base[f'nll/{name}']:.3f} -> {final[f'nll/{name}']:.3f})"
        row(f"{name}: retention exp(-dNLL)", f"retention/{name}", nll)
    row("stability (mean retention)", "sp/stability")
    answer_nll = f"   (answer NLL {base['target/nll']:.3f} -> {final['target/nll']:.3f})"
    row(f"target exact match ({TASK_LABELS[task]})", "target/score", answer_nll)
    row("plasticity (exact match gain)", "sp/plasticity")
    if monitor.stop_decision is not None:
        print(f"\nStopped by the monitor at step {monitor.stop_decision.step} of {max_steps}:")
        for part in monitor.stop_decision.message.split("; "):
            print(f"  {part}")
    else:
        print(f"\nNo budget stopped the run; it ran to step {snaps[-1].step} of {max_steps}.")
    if arena is not None:
        print(f"\nHistory (one JSON line per probe step): {_rel(arena / 'history.jsonl')}")
        print(f"Summary of the run:                     {_rel(arena / 'summary.json')}")
    print(f"TensorBoard events:                     {_rel(tb_dir)}")
    print(f"  view them with: tensorboard --logdir {_rel(Path(tb_dir).parent)}")


if __name__ == "__main__":
    sys.exit(main())
