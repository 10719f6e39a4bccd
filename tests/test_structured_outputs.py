"""Structured outputs (llguidance): a JSON schema, any JSON object, a regex, a choice and a Lark
grammar constrain greedy and sampled output; whatever ends with ``stop`` is valid. In process,
through both front doors (OpenAI ``response_format`` and vLLM's ``guided_*`` with the official
client, gRPC ``StructuredOutput``), bad constraints refused before any worker, and a decode
migration mid-output continuing the same grammar state."""

from __future__ import annotations

import json
import re

import openai
import pytest
import ray

from cluster.config import EngineConfig
from cluster.controller import WorkerState
from cluster.engine.colocated import ColocatedEngine
from cluster.request_types import InvalidRequestError, SamplingParams
from tests.conftest import TEST_ENGINE
from tests.helpers import wait_until_idle

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}
PROMPT = "USER: Describe a person as JSON. ASSISTANT:"


def valid_person(text: str) -> bool:
    value = json.loads(text)
    return (set(value) == {"name", "age", "tags"} and isinstance(value["name"], str) and len(value["name"]) <= 12
            and isinstance(value["age"], int) and value["age"] >= 0
            and all(t in ("a", "b") for t in value["tags"]) and len(value["tags"]) <= 3)


@pytest.fixture(scope="module")
def engine(tiny_models):
    return ColocatedEngine(EngineConfig(model=str(tiny_models["llava-clip-llama"]), **TEST_ENGINE))


def test_each_kind_constrains_greedy_and_sampled_output(engine):
    kinds = {"json_schema": (json.dumps(SCHEMA), valid_person),
             "json_object": ("", lambda t: isinstance(json.loads(t), dict)),
             "regex": (r"[0-9]{3}-[a-z]{2,4}", lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t) is not None),
             "choice": (json.dumps(["red", "green", "blue"]), lambda t: t in ("red", "green", "blue")),
             "grammar": ('start: "(" NUM ("+" NUM)* ")"\nNUM: /[1-9]/', lambda t: re.fullmatch(r"\([1-9](\+[1-9])*\)", t)
                         is not None)}
    free = engine.generate([(PROMPT, [], SamplingParams(max_tokens=30, ignore_eos=True))])[0].text
    assert not valid_person(free) if free.startswith("{") else True
    for kind, (value, ok) in kinds.items():
        stopped = 0
        for params in (SamplingParams(max_tokens=200, structured_output=(kind, value)),
                       SamplingParams(max_tokens=200, temperature=1.0, seed=3, structured_output=(kind, value))):
            [c] = engine.generate([(PROMPT, [], params)])
            if c.finish_reason == "stop":
                stopped += 1
                assert ok(c.text), (kind, c.text)
        assert stopped >= 1 or kind == "json_object", kind  # (an open object may run to max_tokens)
    assert engine.kv_blocks_in_use == 0


def test_bad_constraints_are_refused_before_any_forward(engine):
    for spec, match in [(("json_schema", "{not json"), "invalid structured-output"),
                        (("json_schema", "[1, 2]"), "must be an object"),
                        (("regex", "(unclosed"), "invalid structured-output"),
                        (("choice", "[]"), "1..256 non-empty strings"),
                        (("grammar", "start: undefined_rule"), "invalid structured-output"),
                        (("yaml", "a: 1"), "is not one of"),
                        (("regex", "a" * 70000), "over 65536")]:
        with pytest.raises(InvalidRequestError, match=match):
            engine.inputs.prepare("x", PROMPT, [], SamplingParams(structured_output=spec))


def test_structured_outputs_over_http_grpc_and_a_migration(served_cluster, engine):
    stack = served_cluster("llava-clip-llama")
    client = openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0, timeout=120)
    spec = ("json_schema", json.dumps(SCHEMA))
    [want] = engine.generate([(PROMPT, [], SamplingParams(max_tokens=120, structured_output=spec))])
    assert want.finish_reason == "stop" and valid_person(want.text)
    got = client.completions.create(model="", prompt=PROMPT, max_tokens=120, temperature=0,
                                    extra_body={"guided_json": SCHEMA})
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(
        model="", messages=[{"role": "user", "content": "Describe a person as JSON."}], max_tokens=120,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    assert chat.choices[0].finish_reason == "stop" and valid_person(chat.choices[0].message.content)
    choice = client.completions.create(model="", prompt=PROMPT, max_tokens=20, temperature=0,
                                       extra_body={"guided_choice": ["yes", "no"]})
    assert choice.choices[0].text in ("yes", "no")
    with pytest.raises(openai.BadRequestError, match="structured-output"):
        client.completions.create(model="", prompt=PROMPT, extra_body={"guided_regex": "(unclosed"})
    with pytest.raises(openai.BadRequestError, match="set one of"):
        client.completions.create(model="", prompt=PROMPT, extra_body={"guided_regex": "a", "guided_choice": ["b"]})

    # gRPC, and a decode step failing mid-object: the new worker replays the tokens sent into its
    # matcher and the output is the same valid object
    params = SamplingParams(max_tokens=120, structured_output=spec)
    assert stack.client.generate(PROMPT, [], params).text == want.text
    [decode] = [w for w in stack.cluster.controller.workers("decode") if w.state is WorkerState.READY]
    ray.get(decode.actor.inject_fault.remote("forward", "raise", skip=6), timeout=30)
    migrated = stack.client.generate(PROMPT, [], params)
    assert migrated.text == want.text and migrated.finish_reason == "stop"
    wait_until_idle(stack)
