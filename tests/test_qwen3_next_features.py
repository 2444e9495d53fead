"""The rest of the engine on a hybrid linear-attention model (issue 32 item 7), with the tiny
Qwen3-Next of test_qwen3_next_engine.py: logprobs equal transformers' log-softmax, beam search
equals the reference beam search (each beam's linear-attention state is its own: a beam is its
own sub-request whose state is recomputed or restored from a snapshot, never shared), structured
outputs (a JSON schema and a regex) are valid, and the offline LLM API's chat generates."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from minserve import SamplingParams
from tests.test_beam import _beam_params, reference_beam_search
from tests.test_engine import generate, make_engine, toks
from tests.test_qwen3_next import prompt
from tests.test_qwen3_next_engine import folder, hf, llm  # noqa: F401 (module fixtures)

PROMPT = prompt(35, 11)     # 35 tokens: two full 16-token blocks and a partial one
# bounded values: a random model's integers or strings need not end within max_tokens
SCHEMA = {"type": "object",
          "properties": {"a": {"enum": ["x", "yz", 7]}, "b": {"type": "boolean"}},
          "required": ["a", "b"], "additionalProperties": False}
IPV4 = r"((25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(25[0-5]|2[0-4]\d|1?\d?\d)"


def test_logprobs_match_transformers(llm, hf):  # noqa: F811
    """Sampled tokens' top-3 and the prompt's logprobs (prefilled in 16-token chunks, a run of
    the prompt seen before: its logits are recomputed, not skipped by a state snapshot)."""
    llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    (res,) = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                                   logprobs=3, prompt_logprobs=1),
                          use_tqdm=False)
    out = res.outputs[0]
    seq = torch.tensor([PROMPT + out.token_ids[:-1]])
    with torch.no_grad():
        want = torch.log_softmax(hf(seq).logits[0, len(PROMPT) - 1:].float(), -1)
    assert len(out.logprobs) == 5
    with torch.no_grad():
        ref_prompt = torch.log_softmax(hf(torch.tensor([PROMPT])).logits[0].float(), -1)
    plps = res.prompt_logprobs
    assert plps is not None and len(plps) == len(PROMPT) and plps[0] is None
    for i in range(1, len(PROMPT)):
        assert plps[i].token_id == PROMPT[i]
        assert plps[i].logprob == pytest.approx(ref_prompt[i - 1, PROMPT[i]].item(), abs=1e-3)
    for pos, lp in enumerate(out.logprobs):
        assert lp.token_id == int(want[pos].argmax())
        assert [t for t, _ in lp.top] == want[pos].topk(3).indices.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in lp.top]),
                                   want[pos].topk(3).values, atol=1e-3, rtol=0)


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["snapshots", "recompute"])
def test_beam_search_matches_reference(folder, hf, prefix_caching):  # noqa: F811
    engine = make_engine(folder, max_model_len=128, enable_prefix_caching=prefix_caching)
    outs = generate(engine, [PROMPT], _beam_params(3, 4), ids=["w"])
    got = [toks(outs[f"w-{i}"]) for i in range(3)]
    assert got == reference_beam_search(hf, PROMPT, 3, 4)
    assert len(set(map(tuple, got))) == 3
    assert engine.scheduler.num_running == 0 and not engine.beams.searches


def test_structured_json_schema_and_regex(llm):  # noqa: F811
    outs = llm.generate([PROMPT, PROMPT[:9]], SamplingParams(
        temperature=0, max_tokens=40, structured={"json": SCHEMA,
                                                  "any_whitespace": False}),
        use_tqdm=False)
    for o in outs:
        assert o.outputs[0].finish_reason == "stop", o.outputs[0].text
        jsonschema.validate(json.loads(o.outputs[0].text), SCHEMA)
    outs = llm.generate([PROMPT], SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=20,
                                                 structured={"regex": IPV4}), use_tqdm=False)
    for c in outs[0].outputs:
        assert re.fullmatch(IPV4, c.text), c.text


def test_offline_chat_generates(llm):  # noqa: F811
    (out,) = llm.chat([{"role": "user", "content": "Hello world!"}],
                      SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                      use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 6 and out.prompt_token_ids
