"""`peftkit demo`: the seed's five-customer scenario end to end on one base model.

datasets -> plan -> one NF4 base -> five QLoRA adapters -> base vs adapter on held-out examples
(one mixed batch through the serving engine) -> the HTTP server answering all five customers
concurrently -> summary table, demo_report.md and plots.
"""

import asyncio
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from peftkit.data import chat_ids
from peftkit.demo.report import write_report
from peftkit.demo.tasks import TASKS
from peftkit.engine import Sampling
from peftkit.errors import PeftkitError
from peftkit.models import load_base
from peftkit.plan import format_plan, make_plan
from peftkit.plan.cpu import CPU_TRAIN_EFFICIENCY, cpu_train_seconds, matmul_flops_per_second
from peftkit.plan.memory import train_flops
from peftkit.plan.shapes import shape_from_config
from peftkit.quant import QuantConfig, model_bytes
from peftkit.serve.app import create_app
from peftkit.serve.server import ServeConfig, Server
from peftkit.train import TrainConfig, train
from peftkit.train.joint import JointTrainer


SHARED = "shared"  # the adapter trained on every customer's data mixed
ICL_SHOTS = 4  # in-context learning baseline: this many training examples in the prompt
BASELINES = ("base", "icl", "shared", "adapter")
ANSWER_TOKENS = 24  # the longest answer is ~20 tokens


@dataclass
class DemoConfig:
    model: str = "smollm2-135m"
    output: str = "runs/demo"
    quick: bool = False
    train_examples: int = 64
    test_examples: int = 24
    steps: int = 30
    batch_size: int = 8
    lr: float = 3e-3
    rank: int = 16
    device: str = "auto"  # where the base, the training runs and the server live
    sequential: bool = False  # train the five adapters one after another, not jointly

    def __post_init__(self):
        if self.quick:  # fewer steps, smaller batches and examples; still shows the gap
            self.train_examples, self.test_examples, self.steps = 40, 8, 10
            self.batch_size, self.lr = 4, 5e-3


def say(text: str = "") -> None:
    print(text, flush=True)


def run_demo(cfg: DemoConfig) -> dict:
    t0 = time.perf_counter()
    out = Path(cfg.output)
    data_dir, adapters = out / "data", out / "adapters"
    say(f"== 1. Five customers, {cfg.train_examples} training / {cfg.test_examples} held-out "
        "examples each (generated, seeded)")
    tests, shots, mixed, rows_of = {}, {}, [], {}
    for task in TASKS:
        d = data_dir / task.customer
        d.mkdir(parents=True, exist_ok=True)
        rows = rows_of[task.customer] = task.examples(cfg.train_examples, seed=0)
        _write_jsonl(d / "train.jsonl", rows)
        shots[task.customer], mixed = rows[:ICL_SHOTS], mixed + rows
        tests[task.customer] = task.examples(cfg.test_examples, seed=1)
        _write_jsonl(d / "test.jsonl", tests[task.customer])
        say(f"   {task.customer:<9} {task.description}")
    random.Random(0).shuffle(mixed)  # the baseline of one adapter for everyone: all data mixed
    (data_dir / SHARED).mkdir(parents=True, exist_ok=True)
    _write_jsonl(data_dir / SHARED / "train.jsonl", mixed)

    say("\n== 2. The plan: this scenario, then the seed's (70B, one H100, 5 customers)")
    say(format_plan(make_plan(cfg.model, "L4", tenants=5, seq_len=64, batch=cfg.batch_size,
                              dataset_tokens=cfg.train_examples * 64, epochs=3)))
    say("")
    say(format_plan(make_plan("70B", "H100", tenants=5, dataset_tokens=10_000 * 2048, epochs=3,
                              budget_days=14)))

    say("\n== 3. One NF4 base (blocksize 64, double quantization), five QLoRA adapters")
    base = load_base(cfg.model, task="causal-lm", quantize=QuantConfig(), device=cfg.device)
    if base.quant_report is not None:
        say(f"   {base.quant_report.summary()}")
    base_bytes = model_bytes(base.model)
    # everything that can fail is checked before the training it would waste: every held-out
    # prompt (the in-context one with its examples is the longest) fits the context with its answer
    jobs = eval_jobs(base.tokenizer, tests, shots)
    context = base.model.config.max_position_embeddings
    longest = max(len(ids) for *_, ids in jobs)
    if longest + ANSWER_TOKENS > context:
        raise PeftkitError(f"--model {cfg.model}: a held-out prompt takes {longest} tokens + "
                           f"{ANSWER_TOKENS} to answer, over its {context}-token context")
    tokens_per_row = {t.customer: sum(len(chat_ids(r["messages"], base.tokenizer))
                                      for r in rows_of[t.customer]) / len(rows_of[t.customer])
                      for t in TASKS}
    shape = shape_from_config(cfg.model, base.model.config)
    del base
    # each customer's adapter, and one shared by all that sees as many examples as the five
    # together: five times the steps of the same batch (not five times the batch, which would
    # multiply the joint step's activation memory)
    configs = {name: TrainConfig(
        model=cfg.model, data=str(data_dir / name / "train.jsonl"), method="qlora",
        output=str(out / "runs" / name),
        steps=cfg.steps * (len(TASKS) if name == SHARED else 1), batch_size=cfg.batch_size,
        lr=cfg.lr, rank=cfg.rank, alpha=2 * cfg.rank, dropout=0.0, val_split=0.0, warmup=0.1,
        seed=0, device=cfg.device, overwrite=True)  # the demo's own runs: a rerun replaces them
        for name in [t.customer for t in TASKS] + [SHARED]}
    tokens = sum(c.steps * c.batch_size * (tokens_per_row[name] if name in tokens_per_row else
                                           sum(tokens_per_row.values()) / len(tokens_per_row))
                 for name, c in configs.items())
    rate = matmul_flops_per_second()
    estimate = cpu_train_seconds(shape, "qlora", tokens, rate)
    say(f"   training {len(configs)} adapters, ~{tokens / 1e3:.0f}k tokens: about "
        f"{_duration(estimate)} here (planner: {train_flops(shape, 'qlora', 1) / 1e6:.0f} MFLOP "
        f"a token at {rate / 1e9:.0f} GFLOP/s measured x {CPU_TRAIN_EFFICIENCY['qlora']:.0%}); "
        "the bar's time left updates it as steps run")
    start = time.perf_counter()
    if cfg.sequential:  # one run after another: five loads, five passes over the base per step
        train_reports = {c: train(tc) for c, tc in configs.items()}
    else:  # one base, one batched pass per step for all five (peftkit.train.joint)
        train_reports = JointTrainer(list(configs.items())).run()["reports"]
    train_seconds = time.perf_counter() - start
    for name, report in train_reports.items():
        _copy_adapter(out / "runs" / name / "adapter", adapters / name)
        say(f"   {name:<9} loss {report['train_losses'][0]:.3f} -> "
            f"{report['train_losses'][-1]:.3f}")
    say(f"   {'jointly' if not cfg.sequential else 'one after another'}: {train_seconds:.0f} s "
        f"for {len(configs)} adapters ({len(TASKS)} customers' and one shared by all; "
        f"estimated {estimate:.0f} s)")

    server = Server(ServeConfig(base=cfg.model, adapters=str(adapters), quantize="nf4",
                                max_loaded=len(configs), max_rank=cfg.rank, max_batch=64,
                                device=cfg.device))
    say(f"\n== 4. Held-out exact match: the base, the base shown {ICL_SHOTS} examples in its "
        "prompt, one adapter\n   shared by all customers, each customer's own adapter (all rows "
        "in one mixed batch)")
    accuracy = evaluate(server, jobs, tests)
    for c, acc in accuracy.items():
        say(f"   {c:<9} " + "   ".join(f"{who} {v:6.1%}" for who, v in acc.items()))

    say("\n== 5. The server: five customers' requests at once over HTTP")
    served = asyncio.run(serve_check(server, tests))
    say(f"   {served['correct']}/{served['total']} answers correct, {served['own_format']} in their "
        f"customer's format, {served['foreign']} showing another customer's behaviour; "
        f"{served['seconds']:.1f} s for all")

    adapter_bytes = {t.customer: sum(f.stat().st_size for f in (adapters / t.customer).glob("*.safetensors"))
                     for t in TASKS}
    result = {"config": cfg.__dict__, "accuracy": accuracy, "served": served,
              "memory": {"base_nf4_bytes": base_bytes, "adapter_bytes": adapter_bytes,
                         "separate_models_bytes": len(TASKS) * base_bytes,
                         "shared_bytes": base_bytes + sum(adapter_bytes.values())},
              "load_seconds": dict(zip([t.customer for t in TASKS], server.store.load_seconds)),
              "train": {"joint": not cfg.sequential, "seconds": train_seconds,
                        "estimated_seconds": estimate, "tokens": tokens,
                        "matmul_flops_per_second": rate,
                        "trainable_params": {c: r["trainable_params"]
                                             for c, r in train_reports.items()}},
              "wall_seconds": time.perf_counter() - t0}
    server.stop()
    write_report(result, out)
    return result


def eval_jobs(tok, tests: dict, shots: dict) -> list[tuple]:
    """(task, who, expected answer, prompt ids) for every held-out row and baseline. who: base,
    icl (the base with `shots` in its prompt, as earlier chat turns), shared (one adapter for
    everyone), adapter (the customer's own)."""
    jobs = []
    for task in TASKS:
        examples = [m for ex in shots[task.customer] for m in ex["messages"][1:]]
        for ex in tests[task.customer]:
            system, question = ex["messages"][0], ex["messages"][1:-1]
            for who in BASELINES:
                messages = [system, *examples, *question] if who == "icl" else ex["messages"][:-1]
                jobs.append((task, who, ex["messages"][-1]["content"], chat_ids(messages, tok)))
    return jobs


def evaluate(server: Server, jobs: list[tuple], tests: dict) -> dict:
    """{customer: {who: exact match}} over `eval_jobs`, all rows in one mixed batch."""
    greedy = Sampling(max_tokens=ANSWER_TOKENS, temperature=0.0)
    model = {"base": lambda _t: "", "icl": lambda _t: "", "shared": lambda _t: SHARED,
             "adapter": lambda t: t.customer}
    requests = [server.request(model[who](task), ids, greedy) for task, who, _, ids in jobs]
    server.engine.run_all(requests)  # any number of rows: fed as room frees up
    hits = {(t.customer, who): 0 for t in TASKS for who in BASELINES}
    for (task, who, want, _), req in zip(jobs, requests):
        hits[(task.customer, who)] += task.correct(req.text, want)
    return {t.customer: {who: hits[(t.customer, who)] / len(tests[t.customer])
                         for who in BASELINES} for t in TASKS}


async def serve_check(server: Server, tests: dict, per_customer: int = 3) -> dict:
    """Concurrent chat requests, interleaved across customers, through the HTTP API."""
    server.start()
    transport = httpx.ASGITransport(app=create_app(server))
    calls = []
    async with httpx.AsyncClient(transport=transport, base_url="http://demo", timeout=300) as c:
        for i in range(per_customer):
            for task in TASKS:
                ex = tests[task.customer][i]
                body = {"model": task.customer, "messages": ex["messages"][:-1],
                        "max_tokens": ANSWER_TOKENS,
                        "temperature": 0}
                calls.append((task, ex, c.post("/v1/chat/completions", json=body)))
        start = time.perf_counter()
        responses = await asyncio.gather(*(call for _, _, call in calls))
        seconds = time.perf_counter() - start
    correct = foreign = own = 0
    samples = []
    for (task, ex, _), r in zip(calls, responses):
        text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else ""
        correct += task.correct(text, ex["messages"][-1]["content"])
        own += bool(task.shape.match(text.strip()))
        foreign += any(o.shape.match(text.strip()) for o in TASKS if o is not task)
        if len(samples) < len(TASKS):
            samples.append({"customer": task.customer, "prompt": ex["messages"][1]["content"],
                            "answer": text})
    return {"total": len(calls), "correct": correct, "own_format": own, "foreign": foreign,
            "seconds": seconds,
            "samples": samples}


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _copy_adapter(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
