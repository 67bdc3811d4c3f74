"""XCTL_LLM_EXTRA_BODY: server-specific request fields (llama-server's ``cache_prompt``) reach the
server in every request, through the real `openai` client; a bad value is a usage error."""

from __future__ import annotations

import pytest
from fake_openai import FakeOpenAI, answer

from xctl.core.errors import UsageError
from xctl.diag import LLMConfig, openai_sender

pytest.importorskip("openai")


def test_extra_body_from_the_environment_is_merged_into_each_request() -> None:
    with FakeOpenAI(forever=answer("ok")) as fake:
        env = {"OPENAI_API_KEY": "k", "XCTL_LLM_EXTRA_BODY": '{"cache_prompt": false, "top_k": 1}'}
        config = LLMConfig.resolve(base_url=fake.url, env=env)
        send = openai_sender(config)
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        send(body, 5.0)
        send(body, 5.0)
    assert [(r["cache_prompt"], r["top_k"], r["max_tokens"]) for r in fake.requests] == [(False, 1, 8)] * 2
    assert "cache_prompt" not in body  # the loop's own bodies are left alone


def test_without_it_nothing_is_added() -> None:
    with FakeOpenAI(forever=answer("ok")) as fake:
        config = LLMConfig.resolve(base_url=fake.url, env={"OPENAI_API_KEY": "k"})
        openai_sender(config)({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}, 5.0)
    assert config.extra_body is None
    assert set(fake.requests[0]) == {"model", "messages", "max_tokens"}


@pytest.mark.parametrize(("raw", "message"), [("{nope", "not valid JSON"), ("[1, 2]", "must be a JSON object")])
def test_a_bad_value_is_a_usage_error(raw: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        LLMConfig.resolve(env={"XCTL_LLM_EXTRA_BODY": raw})
