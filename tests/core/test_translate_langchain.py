"""LangChain's ChatOpenAI with a Claude model and ChatAnthropic with an OpenAI model, through the gateway."""

from __future__ import annotations

from langchain_anthropic import ChatAnthropic
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI

from nexgate_proxy.testing import Behaviour, FakeUpstream, gateway_config


def weather(city: str) -> str:
    """Weather in a city."""
    return "Sunny"


async def test_chat_openai_with_a_claude_model(upstream: FakeUpstream, start_gateway) -> None:
    gw = await start_gateway(gateway_config(upstream))
    llm = ChatOpenAI(model="claude-test", base_url=gw.openai_base, api_key=gw.api_key, max_retries=0)
    reply = await llm.ainvoke([SystemMessage("Be brief."), HumanMessage("Hi")])
    assert reply.content == "Bonjour"
    assert reply.usage_metadata["input_tokens"] == 17 and reply.usage_metadata["output_tokens"] == 3
    assert upstream.received[-1].path == "/v1/messages"
    assert upstream.received[-1].body["system"] == [{"type": "text", "text": "Be brief."}]
    chunks = [chunk async for chunk in llm.astream("Hi")]
    assert "".join(c.content for c in chunks) == "Bonjour"
    upstream.behaviour = Behaviour(stop_reason="tool_use", anthropic_content=[
        {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}])
    called = await llm.bind_tools([weather]).ainvoke("Weather in Paris?")
    assert called.tool_calls == [{"name": "weather", "args": {"city": "Paris"}, "id": "toolu_1", "type": "tool_call"}]
    assert upstream.received[-1].body["tools"][0]["name"] == "weather"


async def test_chat_anthropic_with_an_openai_model(upstream: FakeUpstream, start_gateway) -> None:
    gw = await start_gateway(gateway_config(upstream))
    llm = ChatAnthropic(model="gpt-test", base_url=gw.url, api_key=gw.api_key, max_retries=0, max_tokens=50)
    reply = await llm.ainvoke([SystemMessage("Be brief."), HumanMessage("Hi")])
    assert reply.content == "Hello from upstream"
    assert upstream.received[-1].path == "/v1/chat/completions"
    assert upstream.received[-1].body["messages"][0] == {"role": "system", "content": "Be brief."}
    chunks = [chunk async for chunk in llm.astream("Hi")]
    assert "".join(c.text for c in chunks) == "Hello from upstream"
    upstream.behaviour = Behaviour(finish_reason="tool_calls", chat_message={"tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]})
    called = await llm.bind_tools([weather]).ainvoke("Weather in Paris?")
    assert called.tool_calls == [{"name": "weather", "args": {"city": "Paris"}, "id": "call_1", "type": "tool_call"}]
    assert upstream.received[-1].body["tools"][0]["function"]["name"] == "weather"
