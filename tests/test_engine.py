"""The single-process engine: validation, greedy parity through the whole loop, text, finish reasons."""

from __future__ import annotations

import pytest

from expertmesh.engine import Engine, GenerationRequest
from expertmesh.sampling import SamplingParams
from reference import load_reference, reference_greedy


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    return Engine.from_checkpoint(tiny_ckpt, max_batch_size=4, max_seq_len=64)


def greedy(n, **kw):
    return SamplingParams(max_new_tokens=n, ignore_eos=True, **kw)


@pytest.mark.parametrize("request_kwargs, field", [
    (dict(prompt=""), "prompt"),
    (dict(), "prompt"),
    (dict(prompt="hi", prompt_token_ids=(1, 2)), "prompt"),
    (dict(prompt_token_ids=()), "prompt_token_ids"),
    (dict(prompt_token_ids=(1, 32000)), "prompt_token_ids"),
    (dict(prompt_token_ids=(1, 243, 162)), "prompt_token_ids"),  # <0xF0> <0x9F>: half a character
    (dict(prompt_token_ids=(1,) * 64), "prompt_token_ids"),
    (dict(prompt="word " * 200), "prompt"),
    (dict(prompt="hi", request_id="r" * 257), "request_id"),
    (dict(prompt="hi", params=SamplingParams(stop=("x" * 2**20,))), "stop"),
    (dict(prompt="hi", params=SamplingParams(max_new_tokens=0)), "max_new_tokens"),
    (dict(prompt="hi", params=SamplingParams(temperature=-0.5)), "temperature"),
    (dict(prompt="hi", params=SamplingParams(top_p=0.0)), "top_p"),
    (dict(prompt="hi", params=SamplingParams(top_p=1.5)), "top_p"),
    (dict(prompt_token_ids=(1,) * 40, params=SamplingParams(max_new_tokens=30)), "max_new_tokens"),
])
def test_bad_input_names_the_field(engine, request_kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        engine.add(GenerationRequest(**request_kwargs))
    assert not engine.scheduler.has_work()  # nothing half-admitted
    ok = engine.generate([GenerationRequest(prompt="Hello", params=greedy(2))])
    assert len(ok[0].token_ids) == 2


def test_text_too_long_for_the_context_is_refused_without_tokenizing(engine, monkeypatch):
    def encode(*args, **kwargs):
        raise AssertionError("tokenized a prompt that cannot fit")

    monkeypatch.setattr(engine.tokenizer, "encode", encode)
    limit = 2 * engine.tokenizer.max_piece_chars * engine.max_len
    with pytest.raises(ValueError, match=rf"^prompt: {limit + 1} characters cannot fit"):
        engine.add(GenerationRequest(prompt="x" * (limit + 1)))
    assert engine.tokenizer.max_piece_chars == 16  # Mixtral's vocabulary



def test_generate_matches_reference_with_more_requests_than_slots(engine, tiny_ckpt):
    """Six requests of different lengths through four slots: continuous batching, each greedy output
    identical to transformers' on the same prompt."""
    texts = ["The capital of France is", "Hi", "Once upon a time, in a land far away,", "1, 2, 3,",
             "Übermäßig schöne Grüße", "日本語のテキスト"]
    lengths = [12, 5, 20, 3, 9, 16]
    results = engine.generate([GenerationRequest(prompt=t, params=greedy(n)) for t, n in zip(texts, lengths)])
    ref = load_reference(tiny_ckpt)
    for text, n, result in zip(texts, lengths, results):
        assert result.prompt_token_ids == engine.tokenizer.encode(text)
        ref_tokens, _ = reference_greedy(ref, result.prompt_token_ids, n)
        assert result.token_ids == ref_tokens
        assert result.finish_reason == "length"
        assert result.text == engine.tokenizer.completion_text(result.prompt_token_ids, result.token_ids)


def test_streamed_text_concatenates_to_the_full_decode(engine):
    rid = engine.add(GenerationRequest(prompt="Grüße aus 東京", params=SamplingParams(
        max_new_tokens=40, temperature=1.0, seed=5, ignore_eos=True)))
    deltas, ids = [], []
    while engine.scheduler.has_work():
        for out in engine.step():
            assert out.request_id == rid
            deltas.append(out.text)
            ids += out.token_ids
    prompt = engine.tokenizer.encode("Grüße aus 東京")
    assert "".join(deltas) == engine.tokenizer.completion_text(prompt, ids)


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=123, ignore_eos=True)
    alone = engine.generate([GenerationRequest(prompt="Tell me", params=params)])[0].token_ids
    crowd = engine.generate([GenerationRequest(prompt="Other prompt here", params=greedy(8)),
                             GenerationRequest(prompt="Tell me", params=params),
                             GenerationRequest(prompt="x", params=SamplingParams(max_new_tokens=5, temperature=1.0))])
    assert crowd[1].token_ids == alone
    other_seed = engine.generate([GenerationRequest(prompt="Tell me", params=SamplingParams(
        max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=124, ignore_eos=True))])[0].token_ids
    assert other_seed != alone


def test_stop_string_and_stop_token(engine):
    base = engine.generate([GenerationRequest(prompt="Once upon", params=greedy(16))])[0]
    # a stop string taken from the middle of the greedy text cuts it there
    cut = len(base.text) // 2
    stop = base.text[cut : cut + 3]
    stopped = engine.generate([GenerationRequest(prompt="Once upon", params=greedy(16, stop=(stop,)))])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == base.text[: base.text.index(stop)]
    # a stop token id ends generation with that token, whose text is not emitted
    token = base.token_ids[5]
    by_id = engine.generate([GenerationRequest(prompt="Once upon", params=greedy(16, stop_token_ids=(token,)))])[0]
    first = base.token_ids.index(token)
    assert by_id.finish_reason == "stop" and by_id.token_ids == base.token_ids[: first + 1]


class ScriptedRunner:
    """Returns a fixed stream of ids: the engine's postprocessing (EOS, text) without a model."""

    def __init__(self, ids):
        self.ids = list(ids)

    def run(self, plan):
        return [self.ids.pop(0) for s in plan.sample if s]

    def release(self, request_id):
        pass


@pytest.mark.parametrize("ignore_eos, reason, n", [(False, "eos", 3), (True, "length", 5)])
def test_eos_ends_generation_unless_ignored(engine, ignore_eos, reason, n):
    tok = engine.tokenizer
    ids = tok.encode("Hello world again", add_bos=False)[:2] + [tok.eos_id] + tok.encode("x y", add_bos=False)
    scripted = Engine(ScriptedRunner(ids), tok, engine.cfg, type(engine.scheduler)(2, 64))
    out = scripted.generate([GenerationRequest(prompt="Hi", params=SamplingParams(max_new_tokens=5,
                                                                                    ignore_eos=ignore_eos))])[0]
    assert out.finish_reason == reason and out.token_ids == ids[:n]
    assert out.text == tok.completion_text(tok.encode("Hi"), ids[:n])


def test_abort_frees_the_slot(engine):
    rid = engine.add(GenerationRequest(prompt="abc", params=greedy(30)))
    engine.step()
    assert len(engine.scheduler.running) == 1
    engine.abort(rid)
    assert not engine.scheduler.has_work() and len(engine.scheduler.free_slots) == 4


def test_a_lost_kv_cache_is_re_prefilled_and_the_tokens_do_not_change(tiny_ckpt):
    """A runner that loses its cache (a restarted attention shard) mid-generation: the engine
    re-prefills every running sequence from prompt + output so far, and no token changes, is lost or
    is emitted twice. The lost cache is poisoned with NaN, so reading any of it would show."""
    import torch

    from expertmesh.scheduler import CacheLostError

    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    requests = [GenerationRequest(prompt=p, params=params) for p in ("Lost caches", "are rebuilt", "token by token")]
    expected = Engine.from_checkpoint(tiny_ckpt, max_batch_size=3, max_seq_len=64).generate(requests)
    engine = Engine.from_checkpoint(tiny_ckpt, max_batch_size=3, max_seq_len=64)
    runner, calls = engine.runner, []

    def run(plan):
        calls.append(sum(plan.q_lens))
        if len(calls) in (4, 9):  # twice: once in decode, once right after the first re-prefill
            for kv in (*runner.stack.cache.k.values(), *runner.stack.cache.v.values()):
                kv.fill_(float("nan"))
            raise CacheLostError("shard restarted")
        return type(runner).run(runner, plan)

    runner.run = run
    got = engine.generate(requests)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert [r.text for r in got] == [r.text for r in expected]
    assert calls[4] > 3  # the step after a loss prefills again, more than one token per sequence
