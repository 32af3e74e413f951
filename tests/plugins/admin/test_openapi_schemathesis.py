"""schemathesis, every phase and check but one (``st run --checks all``), against a real gateway's admin OpenAPI document.

The document is the contract clients generate code from. As the superadmin, a plain Clerk user and an
organization member, every response must match it (documented status, body schema, content type, the
405 ``Allow`` list, no 5xx), every request it calls valid must not be refused with a 400, and every
request it calls invalid must be refused with a 4xx. Bounded and derandomized so the suite stays fast.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp
import pytest
import schemathesis
from cryptography.hazmat.primitives.asymmetric import rsa
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, events, from_schema

from nexgate_plugins.admin.openapi import build_openapi
from nexgate_proxy.testing import FakeUpstream, gateway_config
from tests.plugins.admin.test_admin_api import ADMIN_TOKEN, Admin, admin_auth, org_with

MAX_EXAMPLES = 15
"""Per operation and phase (hypothesis ``max_examples``); the coverage phase adds its own boundary cases."""


@dataclass
class Run:
    cases: int = 0
    operations: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def run_schemathesis(base_url: str, token: str) -> Run:
    """One ``st run --checks all`` through the Python API; blocking (run it in a thread, one at a time)."""
    schema = schemathesis.openapi.from_url(base_url + "/admin/v1/openapi.json", config=SchemathesisConfig())
    schema.config.update(base_url=base_url, headers={"Authorization": f"Bearer {token}"})
    # Every check but use_after_free: DELETE /users/{id} anonymizes the account and keeps its money history
    # (the privacy policy), so the operator's GET of it answers 200 with the anonymous record, by design.
    schema.config.checks.update(included_check_names=["all"], excluded_check_names=["use_after_free"])
    schema.config.generation.update(max_examples=MAX_EXAMPLES, deterministic=True, database="none")
    run = Run()
    started = time.monotonic()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            run.cases += len(event.recorder.cases)
            if event.label and event.status is not Status.SKIP:
                run.operations.add(event.label)
            for checks in event.recorder.checks.values():
                for check in checks:
                    if check.failure_info is not None:
                        failure = check.failure_info.failure
                        run.failures.append(f"{event.label} {check.name}: {failure.title}: {failure.message[:400]}"
                                            f"\n    {check.failure_info.code_sample}")
        elif isinstance(event, events.NonFatalError):
            run.failures.append(f"{event.label}: {event.info.format()[:2000]}")
        elif isinstance(event, events.FatalError):
            run.failures.append(f"schemathesis failed: {event.exception!r}")
    run.seconds = time.monotonic() - started
    return run


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_schemathesis_finds_no_disagreement_for_any_caller(upstream: FakeUpstream, start_gateway,
                                                                 store_url: str, clerk_key: rsa.RSAPrivateKey) -> None:
    # Brute-force bans off: schemathesis sends thousands of unauthorized cases from one IP on purpose.
    gw = await start_gateway(gateway_config(upstream, storage={"url": store_url}, auth=admin_auth(clerk_key),
                                            limits={"brute_force": False}))
    tokens = {}
    async with aiohttp.ClientSession() as session:
        admin = Admin(gw, session, clerk_key)
        for who in ("owner", "member", "user"):  # session tokens that outlive the run
            tokens[who] = admin.jwt(f"user_st_{who}", exp=int(time.time()) + 3600)
            me = await admin.call("GET", "/me", tokens[who])
            assert me.status == 200, me.body
            if who == "member":
                await org_with(admin, tokens["owner"], **{me.body["user"]["id"]: "member"})
    identities = {"superadmin": ADMIN_TOKEN, "user": tokens["user"], "member": tokens["member"]}
    documented = {f"{method.upper()} {path}" for path, ops in build_openapi()["paths"].items() for method in ops}
    documented.discard("GET /admin/v1/openapi.json")  # no input to generate: schemathesis skips it

    runs = {}
    for name, token in identities.items():  # one after the other: schemathesis runs are not thread-safe
        runs[name] = await asyncio.to_thread(run_schemathesis, gw.url, token)
        print(f"schemathesis as {name}: {runs[name].cases} cases in {runs[name].seconds:.1f} s")

    problems = sorted({f"as {name}: {failure}" for name, run in runs.items() for failure in run.failures})
    assert not problems, "\n".join(problems)
    for name, run in runs.items():
        assert run.operations >= documented, (name, documented - run.operations)
        assert run.cases >= MAX_EXAMPLES * len(documented), (name, run.cases)
