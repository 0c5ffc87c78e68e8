"""Many LoRA adapters on one engine: exactness of mixed batches against merged weights, paging in the
KV pool, per-adapter prefix caching, load/unload, and clear errors for adapters that cannot be served."""
from __future__ import annotations

import json
import os
import random

import pytest
import torch

from kestrel import Engine, SamplingParams
from kestrel.lora.adapter import AdapterError
from kestrel.lora.manager import UnknownAdapter
from tests.conftest import kernel_device
from tests.lora_utils import make_adapter, merge

GREEDY = SamplingParams(max_tokens=12, temperature=0)
# name -> (rank, targets, extra LoraConfig arguments): ranks and target sets differ on purpose
ADAPTERS = {
    "qv": (4, ["q_proj", "v_proj"], {}),
    "all": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], {"use_rslora": True}),
    "mlp": (2, ["gate_proj", "down_proj"], {"alpha_pattern": {"down_proj": 7.0}}),
    "attn": (6, ["k_proj", "o_proj", "up_proj"], {"rank_pattern": {"o_proj": 3}}),
}


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(rng.randrange(3, 40))] for _ in range(n)]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama_dir) -> dict[str, tuple[str, str]]:
    """name -> (adapter dir, merged model dir)."""
    root = tmp_path_factory.mktemp("lora")
    out = {}
    for i, (name, (r, targets, extra)) in enumerate(ADAPTERS.items()):
        path = make_adapter(tiny_llama_dir, str(root / name), r, targets, seed=i, **extra)
        out[name] = (path, merge(tiny_llama_dir, path, str(root / f"{name}-merged")))
    return out


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return _prompts(12, 1)


@pytest.fixture(scope="module")
def references(adapters, tiny_llama_dir, prompts) -> dict:
    """Greedy tokens of every prompt run on the base model (None) and on each merged model."""
    out = {None: [o.token_ids for o in Engine(tiny_llama_dir, dtype="float32").generate(prompts, GREEDY)]}
    for name, (_, merged) in adapters.items():
        out[name] = [o.token_ids for o in Engine(merged, dtype="float32").generate(prompts, GREEDY)]
    return out


def _engine(tiny_llama_dir, adapters, **kwargs) -> Engine:
    return Engine(tiny_llama_dir, dtype="float32", lora_modules={n: p for n, (p, _) in adapters.items()}, **kwargs)


@pytest.mark.parametrize("kernels", ["cpp", "torch"])
def test_mixed_batch_equals_merged_weights(kernels, tiny_llama_dir, adapters, prompts, references):
    """One engine, prompts under different adapters and none, in the same forwards (prefill and decode
    together, requests arriving mid-run): each output equals its merged model's."""
    names = [None, *ADAPTERS]
    choice = [names[i % len(names)] for i in range(len(prompts))]
    engine = _engine(tiny_llama_dir, adapters, kernels=kernels, device=kernel_device(kernels), chunked_prefill_size=32)
    first = [engine.add_request(p, GREEDY, lora=c) for p, c in zip(prompts[:6], choice[:6])]
    for _ in range(3):  # the first half is decoding when the second half's prefills join it
        engine.step()
    later = [engine.add_request(p, GREEDY, lora=c) for p, c in zip(prompts[6:], choice[6:])]
    engine.run_until_done(first + later)
    for i, rid in enumerate(first + later):
        assert engine.get_output(rid).token_ids == references[choice[i]][i], (i, choice[i])
    # the adapters change what the model says: otherwise the comparison above proves nothing
    assert all(references[name] != references[None] for name in ADAPTERS)


def test_generate_selects_adapters_per_prompt(tiny_llama_dir, adapters, prompts, references):
    engine = _engine(tiny_llama_dir, adapters)
    outs = engine.generate(prompts[:4], GREEDY, lora=["all", None, "mlp", "all"])
    assert [o.token_ids for o in outs] == [references["all"][0], references[None][1], references["mlp"][2],
                                           references["all"][3]]
    # the same prompt under two adapters at once: no K/V shared, each right
    outs = engine.generate([prompts[5]] * 3, GREEDY, lora=["qv", "attn", None])
    assert [o.token_ids for o in outs] == [references["qv"][5], references["attn"][5], references[None][5]]


def test_vtc_fairness_works_with_adapters(tiny_llama_dir, adapters, prompts, references):
    """Two clients, each with its own adapter, under vtc with room for two requests at a time: both progress
    while both wait, and every output is still its merged model's."""
    engine = _engine(tiny_llama_dir, adapters, policy="vtc", max_running_requests=2)
    rids = [engine.add_request(prompts[i], GREEDY, client=c, lora=n)
            for i, (c, n) in enumerate([("alice", "qv")] * 4 + [("bob", "mlp")] * 4)]
    order = []
    while engine.has_unfinished():
        engine.step()
        order += [r for r in rids if engine.is_finished(r) and r not in order]
    first_half = order[:4]
    assert any(r in first_half for r in rids[:4]) and any(r in first_half for r in rids[4:])  # shared, not FCFS
    for i, r in enumerate(rids):
        name = "qv" if i < 4 else "mlp"
        assert engine.get_output(r).token_ids == references[name][i]


def test_prefix_cache_is_per_adapter(tiny_llama_dir, adapters, prompts, references):
    engine = _engine(tiny_llama_dir, adapters)
    p = prompts[3] * 3  # long enough to be worth caching
    first = engine.generate(p, GREEDY, lora="qv")[0]
    again = engine.generate(p, GREEDY, lora="qv")[0]
    other = engine.generate(p, GREEDY, lora="all")[0]
    base = engine.generate(p, GREEDY)[0]
    assert again.cached_tokens == len(p) - 1  # reuse within one adapter
    assert other.cached_tokens == 0 and base.cached_tokens == 0  # never across adapters
    assert first.token_ids == again.token_ids
    expected = {n: Engine(adapters[n][1], dtype="float32").generate(p, GREEDY)[0].token_ids for n in ("all",)}
    assert other.token_ids == expected["all"]
    assert base.token_ids == Engine(tiny_llama_dir, dtype="float32").generate(p, GREEDY)[0].token_ids


def test_adapters_share_the_kv_pool(tiny_llama_dir, adapters, prompts, references):
    """Adapters page into the pool and out again under pressure (LRU), and results stay exact."""
    engine = _engine(tiny_llama_dir, adapters, max_total_tokens=200)
    pages = {a.name: a.pages for a in engine.loras.by_name.values()}
    assert sum(pages.values()) > engine.pool.size // 2  # they cannot all stay resident with KV beside them
    free_before = engine.pool.num_free
    for round_ in range(2):
        for i, name in enumerate(ADAPTERS):
            out = engine.generate(prompts[i], GREEDY, lora=name)[0]
            assert out.token_ids == references[name][i]
            a = engine.loras.by_name[name]
            assert a.residency is not None and a.running == 0  # resident after use, no longer pinned
    counts = {a.name: (a.loads, a.evictions) for a in engine.loras.by_name.values()}
    assert sum(e for _, e in counts.values()) > 0, counts  # memory pressure paged some out ...
    assert all(loads >= 1 for loads, _ in counts.values())  # ... and back in when asked for
    used = engine.loras.resident_pages() + engine.cache.total_size
    assert engine.pool.num_free + used == free_before  # every slot accounted for


def test_admission_never_evicts_an_adapter_in_use(tiny_llama_dir, adapters, prompts, references):
    """A pool with room for about one adapter and its KV: requests for another adapter wait instead of
    taking the running one's pages."""
    big = max(ADAPTERS, key=lambda n: ADAPTERS[n][0])
    engine = _engine(tiny_llama_dir, adapters, max_total_tokens=180)
    a = engine.loras.by_name[big]
    assert a.pages + len(prompts[0]) + 40 + min(x.pages for x in engine.loras.by_name.values()) > 180
    others = [n for n in ADAPTERS if n != big]
    long = SamplingParams(max_tokens=40, temperature=0)
    rid = engine.add_request(prompts[0], long, lora=big)
    engine.step()
    waiting = [engine.add_request(prompts[i + 1], GREEDY, lora=n) for i, n in enumerate(others)]
    while not engine.is_finished(rid):
        assert a.residency is not None and a.running == 1, "the running request's adapter left the pool"
        engine.step()
    engine.run_until_done(waiting)
    assert a.evictions == 1  # only once it was idle, to make room for the waiting ones
    expected = Engine(adapters[big][1], dtype="float32").generate(prompts[0], long)[0].token_ids
    assert engine.get_output(rid).token_ids == expected
    for i, (r, n) in enumerate(zip(waiting, others)):
        assert engine.get_output(r).token_ids == references[n][i + 1]


def test_load_and_unload_while_requests_run(tiny_llama_dir, adapters, prompts, references):
    engine = Engine(tiny_llama_dir, dtype="float32")
    engine.load_lora("qv", adapters["qv"][0])
    rid = engine.add_request(prompts[0], GREEDY, lora="qv")
    engine.step()
    engine.load_lora("mlp", adapters["mlp"][0])  # loaded while qv's request runs
    rid2 = engine.add_request(prompts[2], GREEDY, lora="mlp")
    engine.step()
    adapter = engine.loras.by_name["qv"]
    engine.unload_lora("qv")  # its running request finishes with it
    with pytest.raises(UnknownAdapter, match="qv"):
        engine.add_request(prompts[1], GREEDY, lora="qv")
    assert [a["name"] for a in engine.list_loras()] == ["mlp"]
    engine.run_until_done([rid, rid2])
    assert engine.get_output(rid).token_ids == references["qv"][0]
    assert engine.get_output(rid2).token_ids == references["mlp"][2]
    assert adapter.residency is None and adapter.weights is None  # freed once its last request finished
    assert adapter.id not in engine.cache.roots  # and its cached prefixes with it
    with pytest.raises(ValueError, match="already loaded"):
        engine.load_lora("mlp", adapters["mlp"][0])
    engine.load_lora("qv", adapters["qv"][0])  # a name can be loaded again
    assert engine.generate(prompts[0], GREEDY, lora="qv")[0].token_ids == references["qv"][0]


def test_adapters_beyond_host_limit_are_read_again(tiny_llama_dir, adapters, prompts, references):
    engine = _engine(tiny_llama_dir, adapters, max_cpu_loras=1, max_loras=1)
    for _ in range(2):
        for i, name in enumerate(ADAPTERS):
            assert engine.generate(prompts[i], GREEDY, lora=name)[0].token_ids == references[name][i]
    held = [a for a in engine.loras.by_name.values() if a.weights is not None]
    assert len(held) <= 2  # the resident one and at most max_cpu_loras idle ones
    assert all(a.loads == 2 for a in engine.loras.by_name.values())  # max_loras=1: paged in every time


def test_adapter_unreadable_when_needed_again_fails_only_its_requests(tmp_path, tiny_llama_dir, adapters, prompts,
                                                                    references):
    """An adapter whose host copy was dropped (max_cpu_loras) and whose files vanished since: its waiting request
    fails with a clear error; the others are served."""
    import shutil
    gone = _copy(adapters["qv"][0], tmp_path / "qv")
    engine = Engine(tiny_llama_dir, dtype="float32", max_cpu_loras=1, lora_modules={"qv": gone, "mlp": adapters["mlp"][0]})
    assert engine.loras.by_name["qv"].weights is None  # dropped: only one idle host copy is kept
    shutil.rmtree(gone)
    outs = engine.generate([prompts[0], prompts[2]], GREEDY, lora=["qv", "mlp"])
    assert outs[0].finish_reason == "error" and "could not be read again" in outs[0].error
    assert outs[1].token_ids == references["mlp"][2]


def test_unknown_adapter_is_refused(tiny_llama_dir, adapters):
    engine = _engine(tiny_llama_dir, adapters)
    with pytest.raises(UnknownAdapter, match="nope.*loaded adapters: all, attn, mlp, qv"):
        engine.generate([1, 2, 3], GREEDY, lora="nope")
    assert not engine.has_unfinished()


def test_request_that_cannot_fit_beside_its_adapter_is_refused(tiny_llama_dir, adapters, prompts, references):
    engine = _engine(tiny_llama_dir, adapters, max_total_tokens=180)  # "all" takes 128 slots
    too_long = SamplingParams(max_tokens=180 - 128 - len(prompts[0]) + 1, temperature=0)
    with pytest.raises(ValueError, match="pool slots of LoRA adapter 'all' can never fit"):
        engine.add_request(prompts[0], too_long, lora="all")
    assert engine.generate(prompts[0], GREEDY, lora="all")[0].token_ids == references["all"][0]


def _copy(src: str, dst) -> str:
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


def test_bad_adapters_fail_at_load(tmp_path, tiny_llama_dir, tiny_qwen2_dir, adapters):
    engine = Engine(tiny_llama_dir, dtype="float32")
    good = adapters["qv"][0]
    with pytest.raises(AdapterError, match="not a directory"):
        engine.load_lora("x", str(tmp_path / "missing"))
    no_weights = _copy(good, tmp_path / "no-weights")
    os.remove(os.path.join(no_weights, "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="adapter_model.safetensors is missing"):
        engine.load_lora("x", no_weights)
    no_config = _copy(good, tmp_path / "no-config")
    os.remove(os.path.join(no_config, "adapter_config.json"))
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        engine.load_lora("x", no_config)
    # an adapter made for another model: shapes do not fit
    other = make_adapter(tiny_llama_dir, str(tmp_path / "wide"), 4, ["q_proj"])
    from safetensors.torch import load_file, save_file
    tensors = load_file(os.path.join(other, "adapter_model.safetensors"))
    save_file({k: torch.cat([v, v], dim=-1) if "lora_A" in k else v for k, v in tensors.items()},
              os.path.join(other, "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="do not fit the base model"):
        engine.load_lora("x", other)
    with pytest.raises(AdapterError, match="cannot adapt|not a LoRA factor"):
        engine.load_lora("x", make_adapter(tiny_llama_dir, str(tmp_path / "head"), 4, ["lm_head"]))
    with pytest.raises(AdapterError, match="DoRA"):
        engine.load_lora("x", make_adapter(tiny_llama_dir, str(tmp_path / "dora"), 4, ["q_proj"], use_dora=True))
    bad_json = _copy(good, tmp_path / "bad-json")
    with open(os.path.join(bad_json, "adapter_config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        engine.load_lora("x", bad_json)
    wrong_rank = _copy(good, tmp_path / "wrong-rank")
    with open(os.path.join(wrong_rank, "adapter_config.json")) as f:
        cfg = json.load(f)
    cfg["r"] = 16
    with open(os.path.join(wrong_rank, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(AdapterError, match="rank 4 but adapter_config.json says r=16"):
        engine.load_lora("x", wrong_rank)
    assert engine.list_loras() == []  # nothing half-loaded
    assert engine.generate([5, 6, 7], GREEDY)[0].finish_reason == "length"  # the engine is fine


def test_language_gen_takes_lora(tiny_llama_dir, adapters):
    import kestrel as kl

    engine = _engine(tiny_llama_dir, adapters)
    backend = kl.EngineBackend(engine)

    @kl.function
    def program(s):
        s += "Question: what is 2 + 2?"
        s += kl.gen("base", max_tokens=6, temperature=0)
        s += kl.gen("tuned", max_tokens=6, temperature=0, lora="all")

    try:
        state = program.run(backend=backend)
    finally:
        backend.shutdown()  # the engine is the backend thread's until then
    text = "Question: what is 2 + 2?" + state["base"]
    assert state["tuned"] == engine.generate(text, SamplingParams(max_tokens=6, temperature=0), lora="all")[0].text
    assert state["tuned"] != engine.generate(text, SamplingParams(max_tokens=6, temperature=0))[0].text


@pytest.fixture(scope="module")
def embedded_adapters(tmp_path_factory, embedded_dir) -> dict[str, tuple[str, str]]:
    """Two PEFT adapters of the embedded model (random init, non-zero B, scaled so replies stay text)."""
    root = tmp_path_factory.mktemp("embedded-lora")
    specs = {"tuned": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
             "attn": (16, ["q_proj", "v_proj"])}
    out = {}
    for i, (name, (r, targets)) in enumerate(specs.items()):
        path = make_adapter(embedded_dir, str(root / name), r, targets, seed=10 + i, b_scale=0.15)
        out[name] = (path, merge(embedded_dir, path, str(root / f"{name}-merged")))
    return out


def test_embedded_model_mixed_batch_equals_merged(embedded_dir, embedded_adapters, chat_prompt_ids):
    params = SamplingParams(max_tokens=16, temperature=0)
    names = ["tuned", None, "attn", "tuned", "attn", None, "tuned", "attn"]
    prompts = chat_prompt_ids[:len(names)]
    engine = Engine(embedded_dir, dtype="float32", lora_modules={n: p for n, (p, _) in embedded_adapters.items()})
    got = [o.token_ids for o in engine.generate(prompts, params, lora=names)]
    for name in ("tuned", "attn", None):
        model = embedded_adapters[name][1] if name else embedded_dir
        idx = [i for i, n in enumerate(names) if n == name]
        want = [o.token_ids for o in Engine(model, dtype="float32").generate([prompts[i] for i in idx], params)]
        assert [got[i] for i in idx] == want, name
    base = [o.token_ids for o in Engine(embedded_dir, dtype="float32").generate(prompts, params)]
    assert sum(g != b for g, b in zip(got, base)) >= 4  # the adapters change the replies


@pytest.mark.parametrize("kernels", ["cpp", "torch"])
def test_bfloat16_adapters_stay_close_to_merged_float32(kernels, tiny_llama_dir, adapters, prompts):
    """In bf16 (the default on CPUs with native bf16) the low-rank updates are rounded, not exact: teacher-forced
    log-probabilities stay within bf16 noise of the float32 merged model's (a wrong update is off by nats)."""
    seqs = [p + q for p, q in zip(prompts[:4], prompts[4:8])]
    score = SamplingParams(max_tokens=1, prompt_logprobs=0, logprob_start_len=1)
    engine = Engine(tiny_llama_dir, dtype="bfloat16", kernels=kernels, device=kernel_device(kernels),
                    lora_modules={n: p for n, (p, _) in adapters.items()})
    for name in ("all", "attn"):
        got = engine.generate(seqs, score, lora=name)
        want = Engine(adapters[name][1], dtype="float32").generate(seqs, score)
        errors = [abs(g.logprob - w.logprob) for a, b in zip(got, want)
                  for g, w in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:])]
        assert sum(errors) / len(errors) < 0.1 and max(errors) < 1.0, (name, sum(errors) / len(errors), max(errors))


def test_cli_generate_with_an_adapter(tiny_llama_dir, adapters, prompts):
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "kestrel.cli", "generate", "--model", tiny_llama_dir, "--dtype", "float32", "--raw",
           "--max-tokens", "6", "--temperature", "0", "--lora-modules", f"qv={adapters['qv'][0]}"]
    out = subprocess.run(cmd + ["--lora", "qv", "the river"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    expected = _engine(tiny_llama_dir, adapters).generate("the river", SamplingParams(max_tokens=6, temperature=0),
                                                          lora="qv")[0].text
    assert out.stdout.rstrip("\n") == expected
    bad = subprocess.run(cmd + ["--lora", "nope", "the river"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "'nope' does not exist" in bad.stderr
