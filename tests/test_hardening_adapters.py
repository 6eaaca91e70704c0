"""Hardening, adapter directories: corrupt, mismatched or hostile adapters through
`load_adapters`, `peftkit generate --adapter`, a served request and the admin load. Each is a
one-line error (4xx over HTTP, never 5xx), and the server goes on answering every good adapter
exactly as before.
"""

import asyncio
import json
import os
import struct

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from peftkit.cli import main
from peftkit.errors import PeftkitError
from peftkit.formats import load_adapters, save_adapter
from peftkit.methods import LoraConfig, PromptTuningConfig, add_adapter
from peftkit.serve.app import create_app
from peftkit.serve.server import ServeConfig, Server
from tests.helpers import randomize, tiny_llama

KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _good(directory, r=4, seed=0):
    a = add_adapter(tiny_llama().model, LoraConfig(r=r, targets=["q_proj", "v_proj"]))
    randomize(a, seed=seed)
    save_adapter(a, directory)
    return directory


def _set_config(d, **kw):
    cfg = json.loads((d / CONFIG).read_text())
    (d / CONFIG).write_text(json.dumps({**cfg, **kw}))


def _set_tensor(d, key, value):
    t = load_file(d / WEIGHTS)
    t[key] = value
    save_file(t, d / WEIGHTS)


def _raw_config(d, text):
    (d / CONFIG).write_text(text)


def _header_lie(d):  # header length field far past the file's end
    data = bytearray((d / WEIGHTS).read_bytes())
    data[:8] = struct.pack("<Q", 10**12)
    (d / WEIGHTS).write_bytes(bytes(data))


def _offset_lie(d):  # a tensor's data offsets point past the end of the file
    data = (d / WEIGHTS).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"][1] += 10**9
    blob = json.dumps(header).encode()
    (d / WEIGHTS).write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n:])


def _symlink_weights(d, target):
    (d / WEIGHTS).unlink()
    os.symlink(target, d / WEIGHTS)


def _prompt_tuning(d, n_claimed):
    a = add_adapter(tiny_llama().model, PromptTuningConfig(num_virtual_tokens=4))
    save_adapter(a, d)
    _set_config(d, num_virtual_tokens=n_claimed)


A = torch.zeros(4, 64)
CORRUPT = {  # name -> how to spoil a good r=4 LoRA adapter directory (>= 30 kinds)
    "truncated": lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:300]),
    "header_lie": _header_lie,
    "offset_lie": _offset_lie,
    "garbage": lambda d: (d / WEIGHTS).write_bytes(b"not safetensors at all"),
    "empty_weights": lambda d: (d / WEIGHTS).write_bytes(b""),
    "int64": lambda d: _set_tensor(d, KEY, torch.zeros(4, 64, dtype=torch.int64)),
    "bool": lambda d: _set_tensor(d, KEY, torch.zeros(4, 64, dtype=torch.bool)),
    "nan": lambda d: _set_tensor(d, KEY, torch.full((4, 64), float("nan"))),
    "inf": lambda d: _set_tensor(d, KEY, A.clone().fill_(float("inf"))),
    "huge_values": lambda d: _set_tensor(d, KEY, A.clone().fill_(1e30)),
    "rank_mismatch": lambda d: _set_tensor(d, KEY, torch.zeros(8, 64)),
    "other_base": lambda d: _set_tensor(d, KEY, torch.zeros(4, 128)),
    "r_zero": lambda d: _set_config(d, r=0),
    "r_negative": lambda d: _set_config(d, r=-1),
    "r_billion": lambda d: _set_config(d, r=10**9),
    "r_declared_huge": lambda d: _set_config(d, r=65536),
    "r_inf": lambda d: _raw_config(d, (d / CONFIG).read_text().replace('"r": 4', '"r": 1e999')),
    "r_5000_digits": lambda d: _raw_config(d, (d / CONFIG).read_text().replace(
        '"r": 4', '"r": ' + "9" * 5000)),
    "r_string": lambda d: _set_config(d, r="4"),
    "alpha_nan": lambda d: _raw_config(d, json.dumps({**json.loads((d / CONFIG).read_text()),
                                                      "lora_alpha": float("nan")})),
    "alpha_absurd": lambda d: _set_config(d, lora_alpha=1e300),
    "rslora_string": lambda d: _set_config(d, use_rslora="false"),
    "dora_string": lambda d: _set_config(d, use_dora="false"),
    "targets_bool": lambda d: _set_config(d, target_modules=True),
    "config_not_json": lambda d: _raw_config(d, "r: 4\n"),
    "config_nested": lambda d: _raw_config(d, "[" * 100_000),
    "config_list": lambda d: _raw_config(d, "[1, 2]"),
    "config_huge": lambda d: _raw_config(d, json.dumps({"peft_type": "LORA", "x": "y" * 2**21})),
    "unknown_peft_type": lambda d: _set_config(d, peft_type="LOHA"),
    "no_peft_type": lambda d: _set_config(d, peft_type=None),
    "absent_target": lambda d: _set_tensor(
        d, "base_model.model.model.layers.0.self_attn.nope.lora_A.weight", A.clone()),
    "foreign_key": lambda d: _set_tensor(d, "something.else", A.clone()),
    "stray_virtual_tokens": lambda d: _set_tensor(d, "prompt_embeddings", A.clone()),
    "missing_lora_b": lambda d: save_file({k: v for k, v in load_file(d / WEIGHTS).items()
                                           if "q_proj.lora_B" not in k}, d / WEIGHTS),
    "config_is_directory": lambda d: ((d / CONFIG).unlink(), (d / CONFIG).mkdir()),
    "dangling_symlink": lambda d: _symlink_weights(d, d / "gone.safetensors"),
    "weights_fifo": lambda d: ((d / WEIGHTS).unlink(), os.mkfifo(d / WEIGHTS)),
    "config_fifo": lambda d: ((d / CONFIG).unlink(), os.mkfifo(d / CONFIG)),
    "pickle_only": lambda d: ((d / WEIGHTS).unlink(),
                              (d / "adapter_model.bin").write_bytes(b"\x80\x04cos\nsystem\n.")),
    "prompt_100k_tokens": lambda d: _prompt_tuning(d, 100_000),
    "prompt_token_lie": lambda d: _prompt_tuning(d, 5),
}
W, C = "adapter_model.safetensors: ", "adapter_config.json: "
REASONS = {  # name -> what its one line must say: the file, then the reason
    "truncated": W + "corrupt safetensors", "header_lie": W + "corrupt safetensors",
    "offset_lie": W + "corrupt safetensors", "garbage": W + "corrupt safetensors",
    "empty_weights": W + "corrupt safetensors", "int64": "has dtype int64",
    "bool": "has dtype bool", "nan": "holds NaN or Inf", "inf": "holds NaN or Inf",
    "huge_values": "holds values beyond", "rank_mismatch": "has rank 8 but",
    "other_base": "expected (4, 64), got (4, 128)", "r_zero": C + "'r' = 0 is outside",
    "r_negative": C + "'r' = -1 is outside", "r_billion": C + "'r' = 1000000000 is outside",
    "r_declared_huge": "says r=65536", "r_inf": C + "'r' must be an integer",
    "r_5000_digits": C + "invalid JSON", "r_string": C + "'r' must be an integer, got '4'",
    "alpha_nan": C + "'lora_alpha' = nan", "alpha_absurd": C + "'lora_alpha' = 1e+300",
    "rslora_string": "'use_rslora' must be true or false", "dora_string": "'use_dora' must be",
    "targets_bool": "'target_modules' must be", "config_not_json": C + "invalid JSON",
    "config_nested": C + "invalid JSON", "config_list": C + "expected a JSON object",
    "config_huge": C + "2097182 bytes, over", "unknown_peft_type": "unknown peft_type 'LOHA'",
    "no_peft_type": "unknown peft_type None", "absent_target": "self_attn.nope' is not in",
    "foreign_key": "unexpected tensor 'something.else'",
    "stray_virtual_tokens": "unexpected tensor for 'prompt_embeddings' in a LORA adapter", "missing_lora_b": "lacks lora_B",
    "config_is_directory": C + "not a regular file", "dangling_symlink": W + "missing or a",
    "weights_fifo": W + "not a regular file", "config_fifo": C + "not a regular file",
    "pickle_only": "adapter_model.bin: pickle adapters are refused",
    "prompt_100k_tokens": "'num_virtual_tokens' = 100000", "prompt_token_lie": "not 5 virtual",
}
SERVE_ONLY = {"symlink_out_of_root"}  # a user's own `generate --adapter` may point anywhere


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    outside = _good(tmp_path_factory.mktemp("outside") / "elsewhere", seed=9)
    for i in range(3):
        _good(root / f"good{i}", r=4 + 4 * i, seed=i)
    for name, spoil in CORRUPT.items():
        spoil(_good(root / name))
    _symlink_weights(_good(root / "symlink_out_of_root"), outside / WEIGHTS)
    return root


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_load_adapters_refuses_in_one_line(root, name):
    with pytest.raises(PeftkitError) as err:
        load_adapters(tiny_llama().model, {name: root / name})
    assert "\n" not in str(err.value) and len(str(err.value)) < 400
    assert str(root / name) in str(err.value) and REASONS[name] in str(err.value), err.value


def test_generate_cli_refuses_in_one_line(root, capsys):
    assert len(CORRUPT) >= 30
    for name in sorted(CORRUPT):
        rc = main(["generate", "--model", "tiny-llama", "--adapter", str(root / name),
                   "--prompt", "hi", "--max-new-tokens", "2"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("peftkit: error:") and "\n" not in err, (name, err)


def test_server_refuses_every_bad_adapter_and_keeps_serving(root):
    server = Server(ServeConfig(base="tiny-llama", adapters=str(root), max_loaded=4,
                                max_rank=16)).start()
    bad = sorted(CORRUPT) + sorted(SERVE_ONLY)

    def ask(c, model):
        return c.post("/v1/completions", json={"model": model, "prompt": "say one:",
                                               "max_tokens": 6, "temperature": 0})

    async def go():
        transport = httpx.ASGITransport(app=create_app(server))
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            before = [(await ask(c, f"good{i}")).json()["choices"][0]["text"] for i in range(3)]
            statuses = {}
            for name in bad:
                r = await ask(c, name)
                load = await c.post("/v1/load_lora_adapter", json={"lora_name": name})
                statuses[name] = (r.status_code, load.status_code, r.json()["error"]["message"])
            after = await asyncio.gather(*[ask(c, f"good{i % 3}") for i in range(9)])
            base = await ask(c, "tiny-llama")
            return before, statuses, [r.json()["choices"][0]["text"] for r in after], base
    try:
        before, statuses, after, base = asyncio.run(go())
    finally:
        server.stop()
    for name, (req, load, message) in statuses.items():
        assert req in (400, 404) and load in (400, 404), (name, req, load, message)
        assert "\n" not in message
    assert statuses["nan"][0] == 400 and "NaN or Inf" in statuses["nan"][2]
    assert statuses["symlink_out_of_root"][0] == 400
    assert after == before * 3  # every good adapter answers as before the bad loads
    assert base.status_code == 200
    assert set(server.store.stats()["loaded"]) <= {"good0", "good1", "good2"}
