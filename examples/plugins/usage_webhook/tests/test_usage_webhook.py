"""The usage webhook against a real receiver on a socket, behind a real gateway."""

import asyncio
import json

import pytest
from aiohttp import web

import nexgate_usage_webhook
from nexgate_proxy import UsageRecord
from nexgate_proxy.testing import chat, gateway_config, running_gateways

HI = [{"role": "user", "content": "a private prompt"}]


class Receiver:
    """A webhook endpoint: answers the scripted statuses first, then 200; ``hang`` makes it never answer."""

    def __init__(self, statuses=(), hang=False):
        self.statuses = list(statuses)
        self.hang = hang
        self.posts = []  # (status answered, body, authorization)
        self.started = 0

    async def handle(self, request):
        body = await request.read()
        self.started += 1
        if self.hang:
            await asyncio.sleep(3600)
        status = self.statuses.pop(0) if self.statuses else 200
        self.posts.append((status, json.loads(body), request.headers.get("Authorization")))
        return web.Response(status=status)

    @property
    def delivered(self):
        return [record for status, body, _ in self.posts if status == 200 for record in body["records"]]


@pytest.fixture
async def receiver_url():
    receivers = []

    async def start(receiver):
        app = web.Application()
        app.router.add_post("/hook", receiver.handle)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        receivers.append(runner)
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"

    yield start
    for runner in receivers:
        await runner.cleanup()


async def until(condition, seconds=10.0):
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("not within the time")


async def test_records_arrive_in_batches_after_retries_without_content(nexgate_upstream, nexgate_start_gateway,
                                                                      receiver_url):
    receiver = Receiver(statuses=[503, 503])
    url = await receiver_url(receiver)
    config = gateway_config(nexgate_upstream, usage_webhook={
        "url": url, "batch_size": 2, "flush_interval": 0.05, "backoff": 0.01,
        "headers": {"Authorization": "Bearer hook-token"}})
    gw = await nexgate_start_gateway(config, plugins=[nexgate_usage_webhook])
    for _ in range(4):
        await chat(gw)
    await until(lambda: len(receiver.delivered) == 4)
    assert [status for status, _, _ in receiver.posts][:2] == [503, 503]  # the first batch, tried three times
    assert all(len(body["records"]) <= 2 for _, body, _ in receiver.posts)
    assert {auth for _, _, auth in receiver.posts} == {"Bearer hook-token"}
    record = receiver.delivered[0]
    assert set(record) == set(UsageRecord._fields) - {"client_ip"}
    assert record["model"] == "gpt-test" and record["status"] == 200 and record["prompt_tokens"] == 11
    assert "a private prompt" not in json.dumps(receiver.posts)
    assert gw.app[nexgate_usage_webhook.SINK].retries == 2


async def test_a_refused_batch_is_dropped_and_counted_not_retried(nexgate_upstream, nexgate_start_gateway,
                                                                 receiver_url):
    receiver = Receiver(statuses=[400])
    config = gateway_config(nexgate_upstream, usage_webhook={
        "url": await receiver_url(receiver), "batch_size": 1, "flush_interval": 0.05, "backoff": 0.01})
    gw = await nexgate_start_gateway(config, plugins=[nexgate_usage_webhook])
    await chat(gw)
    sink = gw.app[nexgate_usage_webhook.SINK]
    await until(lambda: sink.dropped["undeliverable"] == 1)
    assert len(receiver.posts) == 1 and sink.retries == 0


async def test_a_hanging_webhook_never_slows_requests_and_the_queue_is_bounded(nexgate_upstream, tmp_path,
                                                                               receiver_url):
    receiver = Receiver(hang=True)
    config = gateway_config(nexgate_upstream, usage_webhook={
        "url": await receiver_url(receiver), "batch_size": 1, "flush_interval": 0.01, "max_queue": 3,
        "timeout": 30, "shutdown_timeout": 0.2})
    async with running_gateways(tmp_path) as start:
        gw = await start(config, plugins=[nexgate_usage_webhook])
        sink = gw.app[nexgate_usage_webhook.SINK]
        await chat(gw)
        await until(lambda: receiver.started == 1)
        # The sender is stuck on the first record; the others queue, then overflow. No request waits.
        await asyncio.wait_for(asyncio.gather(*[chat(gw) for _ in range(5)]), timeout=20)
        assert len(sink.queue) == 3 and sink.dropped["queue_full"] == 2
    # Shutdown gave up after its budget and said how many it could not send.
    assert sink.dropped["shutdown"] == 3


async def test_shutdown_flushes_what_is_queued(nexgate_upstream, tmp_path, receiver_url):
    receiver = Receiver()
    config = gateway_config(nexgate_upstream, usage_webhook={
        "url": await receiver_url(receiver), "batch_size": 1000, "flush_interval": 3600})
    async with running_gateways(tmp_path) as start:
        gw = await start(config, plugins=[nexgate_usage_webhook])
        for _ in range(3):
            await chat(gw)
        assert receiver.posts == []  # an hour's interval and a big batch: nothing sent yet
    assert len(receiver.posts) == 1 and len(receiver.delivered) == 3


async def test_without_its_section_the_plugin_is_idle(nexgate_upstream, nexgate_start_gateway):
    gw = await nexgate_start_gateway(gateway_config(nexgate_upstream), plugins=[nexgate_usage_webhook])
    assert await chat(gw) == "Hello from upstream"
    assert nexgate_usage_webhook.SINK not in gw.app
