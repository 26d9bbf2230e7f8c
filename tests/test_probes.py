import json

import pytest
import torch
from helpers import corpus, make_model

from arena_callbacks import Probe, ProbeDataError, ProbeRunner, ProbeSet, ProbeSettings
from arena_callbacks.probes import load_rows

TEXT = [{"text": s} for s in corpus(7, seed=3)]
MC = [
    {"context": "the cat", "choices": [" runs.", " sings into the river.", " is"], "answer": 0},
    {"question": "one two three", "choices": [" four", " five six"], "label": 1},
    {"context": "red blue", "choices": [" green", " dog", " bird", " fish"], "answer": 2},
]
COMP = [{"prompt": "one two three", "completion": " four five"}, {"prompt": "the dog", "completion": " jumps."}]


def runner(tokenizer, settings=None, **probes):
    settings = settings or ProbeSettings(batch_size=3)
    r = ProbeRunner({n: ProbeSet.build(n, d, settings) for n, d in probes.items()}, settings)
    r.prepare(tokenizer)
    return r


def ref_logprobs(model, ids, start):
    """Unpadded single-sequence forward with full logits; float64 log-softmax."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    tgt = torch.tensor(ids[start:])
    rows = lp[start - 1 : len(ids) - 1]
    return rows.gather(-1, tgt[:, None]).squeeze(-1), bool((rows.argmax(-1) == tgt).all())


def pair(tok, ctx, cont):
    c = tok(ctx)["input_ids"]
    w = tok(ctx + cont)["input_ids"]
    assert w[: len(c)] == c  # the test data splits cleanly at the boundary
    return w, len(c)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_text_nll_matches_hand_computation(tokenizer, kind):
    model = make_model(vocab_size=len(tokenizer), kind=kind)
    got = runner(tokenizer, general=TEXT).run(model)["general"]
    total, n = 0.0, 0
    for row in TEXT:
        lp, _ = ref_logprobs(model, tokenizer(row["text"])["input_ids"], 1)
        total, n = total - lp.sum().item(), n + lp.numel()
    assert got.kind == "text" and got.score is None and got.examples == len(TEXT) and got.tokens == n
    assert got.nll == pytest.approx(total / n, rel=1e-5)


def test_multiple_choice_accuracy_and_nll_by_hand(tokenizer, model):
    got = runner(tokenizer, facts=MC).run(model)["facts"]
    correct, nll, n = 0, 0.0, 0
    for row in MC:
        ctx = row.get("context", row.get("question"))
        ans = row.get("answer", row.get("label"))
        sums = []
        for j, choice in enumerate(row["choices"]):
            ids, start = pair(tokenizer, ctx, choice)
            lp, _ = ref_logprobs(model, ids, start)
            sums.append(lp.sum().item())
            if j == ans:
                nll, n = nll - lp.sum().item(), n + lp.numel()
        correct += int(max(range(len(sums)), key=lambda j: sums[j]) == ans)
    assert got.score == pytest.approx(correct / len(MC))
    assert got.nll == pytest.approx(nll / n, rel=1e-5) and got.tokens == n


def test_completion_exact_match_by_hand(tokenizer, model):
    got = runner(tokenizer, target=COMP).run(model)["target"]
    em, nll, n = 0, 0.0, 0
    for row in COMP:
        ids, start = pair(tokenizer, row["prompt"], row["completion"])
        lp, greedy = ref_logprobs(model, ids, start)
        em, nll, n = em + greedy, nll - lp.sum().item(), n + lp.numel()
    assert got.score == pytest.approx(em / len(COMP)) and got.nll == pytest.approx(nll / n, rel=1e-5)


def test_exact_match_is_one_when_the_model_predicts_the_answer(tokenizer):
    """A model whose logits always favour the next gold token gets EM = 1 (known case)."""
    ids, _start = pair(tokenizer, COMP[0]["prompt"], COMP[0]["completion"])

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None, use_cache=None, position_ids=None):
            # The gold token after each position (the pass never feeds the last token: it is only a target).
            logits = torch.zeros(*input_ids.shape, len(tokenizer))
            for b in range(input_ids.shape[0]):
                for t in range(input_ids.shape[1]):
                    p = int(position_ids[b, t])
                    if p + 1 < len(ids):
                        logits[b, t, ids[p + 1]] = 50.0
            return {"logits": logits}

    got = runner(tokenizer, target=[COMP[0]]).run(Oracle())["target"]
    assert got.score == 1.0 and got.nll < 1e-12


def test_batching_and_padding_do_not_change_results(tokenizer, model):
    a = runner(tokenizer, ProbeSettings(batch_size=1), general=TEXT, facts=MC).run(model)
    b = runner(tokenizer, ProbeSettings(batch_size=16), general=TEXT, facts=MC).run(model)
    for k in a:
        assert a[k].nll == pytest.approx(b[k].nll, rel=1e-5) and a[k].score == b[k].score


def test_eval_mode_no_grad_and_train_mode_restored(tokenizer, model):
    model.train()
    seen = {}

    def hook(mod, args, out):
        seen["training"] = mod.training
        seen["grad"] = torch.is_grad_enabled()

    model.model.register_forward_hook(hook)
    runner(tokenizer, general=TEXT[:2]).run(model)
    assert seen == {"training": False, "grad": False}
    assert model.training is True


def test_precision_ignores_ambient_autocast(tokenizer, model):
    r32 = runner(tokenizer, general=TEXT)
    plain = r32.run(model)["general"].nll
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what TRL's bf16 default leaves around
        under_trainer_autocast = r32.run(model)["general"].nll
        bf16 = runner(tokenizer, ProbeSettings(precision="bf16"), general=TEXT).run(model)["general"].nll
    assert under_trainer_autocast == plain
    assert bf16 != plain and bf16 == pytest.approx(plain, rel=2e-2)


def test_peft_lora_and_oft_models(tokenizer, model):
    peft = pytest.importorskip("peft")
    r = runner(tokenizer, general=TEXT, facts=MC)
    base = r.run(model)
    for cfg in (
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        peft.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    ):
        pm = peft.get_peft_model(make_model(vocab_size=len(tokenizer)), cfg)
        got = r.run(pm)
        # Fresh adapters are the identity: same numbers as the base model.
        for k in base:
            assert got[k].nll == pytest.approx(base[k].nll, rel=1e-5), type(cfg).__name__
        with torch.no_grad():  # move the adapter: the probe sees it
            for _name, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_(0.5 * torch.randn_like(p))
        assert r.run(pm)["general"].nll != pytest.approx(base["general"].nll, rel=1e-4)


def test_max_examples_is_a_seeded_sample():
    rows = [{"text": f"row {i}"} for i in range(50)]
    a = ProbeSet.build("g", rows, ProbeSettings(max_examples=10, seed=1))
    b = ProbeSet.build("g", rows, ProbeSettings(max_examples=10, seed=1))
    c = ProbeSet.build("g", rows, ProbeSettings(max_examples=10, seed=2))
    assert a.row_ids == b.row_ids != c.row_ids and len(a.rows) == 10
    assert [r["text"] for r in a.rows] == [f"row {i}" for i in a.row_ids]


def test_load_rows_from_jsonl_dataset_and_list(tmp_path):
    from datasets import Dataset

    p = tmp_path / "p.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in MC) + "\n\n")
    assert load_rows(p, "x") == MC
    same_columns = [MC[0], MC[2]]
    assert load_rows(Dataset.from_list(same_columns), "x") == same_columns
    # Columns a row does not use hold None in a Dataset ('question' vs 'context'): still valid.
    mixed = [
        {"context": "the cat", "question": None, "choices": [" runs.", " is"], "answer": 0, "label": None},
        {"context": None, "question": "one two", "choices": [" three", " dog"], "answer": None, "label": 1},
    ]
    built = ProbeSet.build("x", Dataset.from_list(mixed), ProbeSettings())
    assert built.kind == "multiple_choice" and built.rows == mixed
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{nope\n')
    with pytest.raises(ProbeDataError, match=r"probe 'x': .*bad.jsonl line 2 is not valid JSON"):
        load_rows(bad, "x")


@pytest.mark.parametrize(
    "data, kind, match",
    [
        ([], None, r"probe 'p': the probe set is empty"),
        ([{"text": "a"}, {"txt": "b"}], None, r"probe 'p' \(text\), row 1: missing field 'text'"),
        ([{"text": ""}], None, r"row 0: field 'text' must be a non-empty string"),
        ([{"text": "a"}, {"text": None}], None, r"probe 'p' \(text\), row 1: missing field 'text'"),
        (
            [{"context": "q", "choices": ["a", "b"], "answer": 2}],
            None,
            r"row 0: field 'answer' = 2 is out of range for 2 choices \(valid: 0..1\)",
        ),
        ([{"context": "q", "choices": ["a"], "answer": 0}], None, r"must be a list of at least 2 strings"),
        ([{"context": "q", "choices": ["a", "b"]}], None, r"missing field 'answer' \(or 'label'\)"),
        ([{"choices": ["a", "b"], "answer": 0}], None, r"missing field 'context' \(or 'question'\)"),
        ([{"context": "q", "choices": ["a", "b"], "answer": "0"}], None, r"must be an integer index"),
        ([{"prompt": "p"}], "completion", r"probe 'p' \(completion\), row 0: missing field 'completion'"),
        ([{"foo": 1}], None, r"cannot tell the probe kind"),
        ([{"text": "a"}], "essay", r"kind 'essay' is not one of"),
        ("not-a-file.jsonl", None, r"file not found"),
        ([1, 2], None, r"row 0: expected a dict"),
    ],
)
def test_bad_probe_data_names_probe_and_row(data, kind, match):
    with pytest.raises(ProbeDataError, match=match):
        ProbeSet.build("p", Probe(data, kind=kind), ProbeSettings())


def test_too_long_rows_reported_at_prepare_with_row_id(tokenizer):
    rows = [{"text": "one two"}, {"text": " ".join(["seven"] * 200)}]
    s = ProbeSettings(max_length=32)
    r = ProbeRunner({"g": ProbeSet.build("g", rows, s)}, s)
    with pytest.raises(ProbeDataError, match=r"probe 'g' \(text\), row 1: \d+ tokens, longer than probe.max_length=32"):
        r.prepare(tokenizer)
    s2 = ProbeSettings(max_length=32, truncate=True)
    r2 = ProbeRunner({"g": ProbeSet.build("g", rows, s2)}, s2)
    r2.prepare(tokenizer)
    assert max(len(q.ids) for q in r2._seqs["g"]) == 32


def test_run_before_prepare_and_missing_tokenizer(tokenizer, model):
    s = ProbeSettings()
    r = ProbeRunner({"g": ProbeSet.build("g", TEXT, s)}, s)
    with pytest.raises(RuntimeError, match="before prepare"):
        r.run(model)
    with pytest.raises(ValueError, match="pass ForgettingMonitor\\(..., tokenizer=...\\)"):
        r.prepare(None)


def test_forward_error_becomes_probe_failure(tokenizer, model):
    from arena_callbacks import ProbeFailure

    r = runner(tokenizer, general=TEXT)

    def boom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    model.train()
    model.forward = boom
    with pytest.raises(ProbeFailure, match="out of memory"):
        r.run(model)
    assert model.training  # train mode restored even on failure


def test_failure_outside_the_forward_is_a_probe_failure_too(tokenizer, model):
    from arena_callbacks import ProbeFailure

    r = runner(tokenizer, general=TEXT)

    def broken_get_base_model():
        raise RuntimeError("broken wrapper")

    model.get_base_model = broken_get_base_model  # fails while inspecting the forward, before any batch
    with pytest.raises(ProbeFailure, match="broken wrapper"):
        r.run(model)


# ------------------------------------------------------------------ conversational rows
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
CHATS = [
    {"messages": [{"role": "user", "content": "one two three"}, {"role": "assistant", "content": " four five"}]},
    {"messages": [{"role": "system", "content": "the cat"}, {"role": "user", "content": "red blue"},
                  {"role": "assistant", "content": " green dog."}]},
]


@pytest.fixture
def chat_tokenizer(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_conversational_completion_nll_matches_a_float64_reference_on_the_templated_tokens(chat_tokenizer, model):
    """The answer is what the template writes after the generation prompt; its tokens are scored,
    on the template's own tokens (no second BOS)."""
    got = runner(chat_tokenizer, chat=CHATS).run(model)["chat"]
    assert got.kind == "completion"
    nll, n, em = 0.0, 0, 0
    for row in CHATS:
        msgs = row["messages"]
        prompt = chat_tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        full = chat_tokenizer.apply_chat_template(msgs, tokenize=False)
        assert full.startswith(prompt) and full.count("<s>") == 1
        ids = chat_tokenizer(full, add_special_tokens=False)["input_ids"]
        start = len(chat_tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert ids[:start] == chat_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        lp, exact = ref_logprobs(model, ids, start)
        nll, n, em = nll - lp.sum().item(), n + lp.numel(), em + int(exact)
    assert got.tokens == n and got.nll == pytest.approx(nll / n, rel=1e-5)
    assert got.score == pytest.approx(em / len(CHATS))


def test_conversations_as_text_and_trl_prompt_completion(chat_tokenizer, model):
    trl_rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in CHATS]
    as_text = [{"messages": r["messages"][:-1]} for r in CHATS]  # no assistant turn: a text row
    r = runner(chat_tokenizer, chat=CHATS, trl=trl_rows, whole=as_text)
    got = r.run(model)
    assert got["trl"].kind == "completion" and got["trl"].nll == got["chat"].nll
    assert got["whole"].kind == "text"
    total, n = 0.0, 0
    for row in as_text:
        ids = chat_tokenizer(chat_tokenizer.apply_chat_template(row["messages"], tokenize=False),
                             add_special_tokens=False)["input_ids"]
        lp, _ = ref_logprobs(model, ids, 1)
        total, n = total - lp.sum().item(), n + lp.numel()
    assert got["whole"].tokens == n and got["whole"].nll == pytest.approx(total / n, rel=1e-5)
    # An explicit text probe over whole conversations scores every token of each.
    assert runner(chat_tokenizer, w=Probe(CHATS, kind="text")).run(model)["w"].kind == "text"


def test_conversational_row_errors(tokenizer, chat_tokenizer):
    with pytest.raises(ProbeDataError, match=r"probe 'chat' \(completion\), row 0: conversational rows need a "
                                             r"tokenizer with a chat template"):
        runner(tokenizer, chat=CHATS)
    bad = [{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}]
    with pytest.raises(ProbeDataError, match=r"row 0: messages\[0\] needs string 'role' and 'content'"):
        runner(chat_tokenizer, chat=bad)
    one = [{"messages": [{"role": "assistant", "content": "x"}]}]
    with pytest.raises(ProbeDataError, match=r"ends with the assistant's message, after at least one other"):
        runner(chat_tokenizer, chat=one)
    with pytest.raises(ProbeDataError, match=r"conversational rows are text or completion probes"):
        runner(chat_tokenizer, chat=Probe(CHATS, kind="multiple_choice"))
