"""Issue 26.1: the grammar engine for structured outputs, chosen by measurement — llguidance vs
outlines-core on this CPU with SmolLM2's 49,152-token vocabulary.

Per engine and JSON schema: the time to compile a request's grammar (what a request with a new
schema pays before its first token), and the time per generated token to compute the allowed
set and advance the state, walked along a valid answer's own tokens. The tokenizer setup (once
per server) is reported apart. outlines-core gets its vocabulary as raw bytes per token (the
byte-level BPE alphabet undone), as its `from_pretrained` builds it.

Then the engine as served: 32 rows of SmolLM2-135M-Instruct in one batch, each with its own JSON
schema, constrained vs the same rows unconstrained for exactly as many tokens each (EOS banned),
so the two runs keep the same batch shape step for step: the time ratio is the grammar's cost.
And 512 answers (16 batches of 32 schemas, sampled at temperature 0.7) parsed and validated
against their schemas by jsonschema.

Run alone: `python -m bench.grammar`.
"""

import json
import random
import statistics
import time

import jsonschema

from bench.common import write_results
from peftkit.constrain import grammar_for
from peftkit.data import chat_ids
from peftkit.engine import Engine, Request, Sampling
from peftkit.generation import PlainModel
from peftkit.models import load_base
from peftkit.serve.logprobs import byte_decoder

SCHEMAS = {
    "label": {"type": "object", "properties": {"label": {"enum": ["billing", "bug", "sales"]}},
              "required": ["label"], "additionalProperties": False},
    "contact": {"type": "object", "properties": {
        "name": {"type": "string"}, "email": {"type": "string"}, "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "email", "age", "tags"], "additionalProperties": False},
    "order": {"type": "object", "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
            "required": ["sku", "qty"], "additionalProperties": False}},
        "total": {"type": "number"}}, "required": ["id", "items", "total"],
        "additionalProperties": False},
}
ANSWERS = {
    "label": {"label": "billing"},
    "contact": {"name": "Ada Lovelace", "email": "ada@example.com", "age": 36,
                "tags": ["math", "engines"]},
    "order": {"id": "ABC-1234", "items": [{"sku": "X1", "qty": 2}, {"sku": "Y22", "qty": 1}],
              "total": 19.5},
}


def _summary(compile_s: list[float], steps: list[float], tokens: int) -> dict:
    return {"compile_ms": 1e3 * statistics.median(compile_s),
            "per_token_us": 1e6 * statistics.median(steps),
            "p99_token_us": 1e6 * sorted(steps)[int(0.99 * len(steps))], "tokens": tokens}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_llguidance(tok, vocab: int) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt
    out = {}
    start = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    out["setup_s"] = time.perf_counter() - start
    mask = lt.allocate_token_bitmask(1, vocab)
    for name, schema in SCHEMAS.items():
        ids = tok(json.dumps(ANSWERS[name]), add_special_tokens=False).input_ids
        compile_s, steps = [], []
        for _ in range(5):
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
            start = time.perf_counter()
            matcher = llguidance.LLMatcher(lltok, grammar)
            compile_s.append(time.perf_counter() - start)
            for t in ids:
                start = time.perf_counter()
                lt.fill_next_token_bitmask(matcher, mask, 0)
                assert matcher.consume_token(t), matcher.get_error()
                steps.append(time.perf_counter() - start)
        out[name] = _summary(compile_s, steps, len(ids))
    return out


def bench_outlines(tok, vocab: int) -> dict:
    import torch
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    out = {}
    start = time.perf_counter()
    decode, by_bytes = byte_decoder(), {}
    special = set(tok.all_special_ids)
    for token, i in tok.get_vocab().items():
        if i in special or i >= vocab:
            continue
        raw = bytes(decode.get(c, ord(c) % 256) for c in token)
        by_bytes.setdefault(raw, []).append(i)
    vocabulary = Vocabulary(tok.eos_token_id, by_bytes)
    out["setup_s"] = time.perf_counter() - start
    mask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
    for name, schema in SCHEMAS.items():
        ids = tok(json.dumps(ANSWERS[name], separators=(",", ":")),
                  add_special_tokens=False).input_ids
        regex = build_regex_from_schema(json.dumps(schema))
        compile_s, steps = [], []
        for _ in range(2):  # the index build is the slow part: fewer repeats
            start = time.perf_counter()
            index = Index(regex, vocabulary)
            compile_s.append(time.perf_counter() - start)
            guide = Guide(index)
            for t in ids:
                start = time.perf_counter()
                guide.write_mask_into(mask.data_ptr(), mask.numel(), 4)
                guide.advance(t)
                steps.append(time.perf_counter() - start)
        out[name] = _summary(compile_s, steps, len(ids))
    return out


FIELDS = {"name": {"type": "string", "maxLength": 24}, "city": {"type": "string", "maxLength": 16},
          "age": {"type": "integer", "minimum": 0, "maximum": 120}, "vip": {"type": "boolean"},
          "tier": {"enum": ["gold", "silver", "bronze"]},
          "tags": {"type": "array", "items": {"enum": ["new", "late", "paid"]}, "maxItems": 3}}


def schema_variants(n: int, seed: int) -> list[dict]:
    """n different object schemas: each a random subset and order of FIELDS (every answer
    bounded in length, so a row that runs out of tokens is the grammar's fault, not the
    schema's)."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        keys = rng.sample(list(FIELDS), rng.randint(2, 5))
        schema = {"type": "object", "properties": {k: FIELDS[k] for k in keys},
                  "required": keys, "additionalProperties": False}
        if schema not in out:
            out.append(schema)
    return out


def _requests(tok, schemas, constrained: bool, temperature: float, seed: int, lengths=None):
    reqs = []
    for i, schema in enumerate(schemas):
        ask = ("Describe a customer as a JSON object with exactly these fields: "
               + ", ".join(schema["properties"]) + ".")
        ids = chat_ids([{"role": "user", "content": ask}], tok)
        if constrained:
            s = Sampling(128, temperature, seed=seed + i,
                         grammar=grammar_for("json_schema", schema, "bench"))
        else:  # as many tokens as the constrained row made, never stopping early
            s = Sampling(lengths[i], temperature, seed=seed + i,
                         logit_bias={tok.eos_token_id: -100.0})
        reqs.append(Request(ids, -1, s))
    return reqs


def bench_engine(base, rounds: int = 16) -> dict:
    """The served cost (constrained / unconstrained at the same batch shape) and validity."""
    tok = base.tokenizer
    engine = Engine(PlainModel(base.model), tok, max_batch=32)
    schemas = schema_variants(32, seed=0)
    engine.run_all(_requests(tok, schemas[:2], True, 0.0, 0))  # warm-up (tokenizer setup)
    start = time.perf_counter()
    shaped = engine.run_all(_requests(tok, schemas, True, 0.0, 0))
    constrained_s = time.perf_counter() - start
    lengths = [max(len(r.out_ids), 1) for r in shaped]
    start = time.perf_counter()
    free = engine.run_all(_requests(tok, schemas, False, 0.0, 0, lengths))
    free_s = time.perf_counter() - start
    assert [len(r.out_ids) for r in free] == lengths
    valid, total, stops = 0, 0, 0
    for k in range(rounds):
        schemas_k = schema_variants(32, seed=100 + k)
        for r, schema in zip(engine.run_all(_requests(tok, schemas_k, True, 0.7, 1000 * k)),
                             schemas_k):
            total += 1
            stops += r.finish_reason == "stop"
            try:
                jsonschema.validate(json.loads(r.text), schema)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                pass
    return {"tokens": sum(lengths), "constrained_s": constrained_s, "free_s": free_s,
            "ratio": constrained_s / free_s, "valid": valid, "outputs": total, "stopped": stops,
            "example": shaped[0].text}


def main() -> None:
    base = load_base("smollm2-135m")
    tok, vocab = base.tokenizer, base.model.config.vocab_size
    results = {"vocab": vocab, "llguidance": bench_llguidance(tok, vocab),
               "outlines-core": bench_outlines(tok, vocab), "engine": bench_engine(base)}
    e = results["engine"]
    rows = [("32 rows, 32 different JSON schemas: constrained / unconstrained time, same tokens",
             f"{e['ratio']:.2f} ({e['constrained_s']:.1f} vs {e['free_s']:.1f} s, "
             f"{e['tokens']} tokens)", "<= 1.15"),
            ("answers that parse and validate against their schema (jsonschema)",
             f"{e['valid']}/{e['outputs']} ({e['stopped']} ended by the grammar, the rest at "
             "max_tokens 128)", "100%")]
    for engine in ("llguidance", "outlines-core"):
        r = results[engine]
        rows.append((f"{engine}: tokenizer setup (once per server)", f"{r['setup_s']:.2f} s", ""))
        for name in SCHEMAS:
            s = r[name]
            rows.append((f"{engine}, schema '{name}': compile / per token (median, p99)",
                         f"{s['compile_ms']:.1f} ms / {s['per_token_us']:.0f} us, "
                         f"{s['p99_token_us']:.0f} us", "per token << a decode step"))
    write_results("grammar", f"Grammar engines on SmolLM2's {vocab}-token vocabulary", rows,
                  results)


if __name__ == "__main__":
    main()
