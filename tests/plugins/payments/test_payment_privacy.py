"""No card data: of a DodoPayments delivery NexGate keeps the credit and the references, nothing of the payer."""

from __future__ import annotations

import re

import nexgate_plugins.payments as payments
from nexgate_proxy.testing import FakeUpstream
from tests.dbdump import dump_database
from tests.plugins.payments.test_payments import deliver, ledger, payment, payments_config, usd

PAYER = {"card_last_four": "4242", "card_network": "VISA", "card_type": "credit", "card_issuing_country": "NZ",
         "payment_method": "card", "customer": {"customer_id": "cus_payer_77", "email": "payer.person@example.com",
                                                "name": "Payer Q. Person"},
         "billing": {"city": "Wellington", "country": "NZ", "state": "WGN", "street": "12 Kelburn Parade",
                     "zipcode": "6012"}}


async def test_a_payment_keeps_no_card_or_payer_data(upstream: FakeUpstream, start_gateway, store_url: str,
                                                     backend: str) -> None:
    gw = await start_gateway(payments_config(upstream, storage={"url": store_url}), plugins=[payments])
    status, body = await deliver(gw, payment(gw.user_id, "pay_private_1", **PAYER), webhook_id="msg_private_1")
    assert status == 200, body
    assert [(e.kind, e.amount_pico) for e in await ledger(gw)] == [("payment", usd("20"))]
    dump = await dump_database(store_url, backend)
    assert "pay_private_1" in dump  # the reference, as the policy says
    for value in ("VISA", "payer.person@example.com", "Payer Q. Person", "cus_payer_77", "Wellington", "Kelburn"):
        assert value not in dump, value
    for digits in ("4242", "6012"):  # as a number of its own: timestamps' microseconds may hold the same digits
        assert not re.search(rf"(?<!\d){digits}(?!\d)", dump), digits
