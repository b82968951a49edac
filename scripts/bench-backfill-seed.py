"""Seeds a local Stripe API server (localstripe) for scripts/bench-backfill: N customers, the
first S of them with a card and one subscription. Subscriptions are few because localstripe
scans its whole store several times per subscription it creates, so seeding thousands takes
longer than the benchmark. Runs with the localstripe venv's interpreter (it has aiohttp).

    python bench-backfill-seed.py <api base> <customers> <subscribed> [concurrency]
"""
import asyncio
import sys

import aiohttp

KEY = "sk_test_bench"


async def post(session, base, path, body, ok=(200,)):
    async with session.post(base + path, json=body,
                            headers={"Authorization": "Bearer " + KEY}) as r:
        if r.status not in ok:
            raise SystemExit(f"POST {path}: {r.status} {await r.text()}")
        return await r.json()


async def main():
    base, customers, subscribed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    concurrency = int(sys.argv[4]) if len(sys.argv) > 4 else 8
    async with aiohttp.ClientSession() as session:
        await post(session, base, "/v1/products", {"id": "prod_bench", "name": "Bench"}, (200, 409))
        await post(session, base, "/v1/plans", {"id": "price_bench", "product": "prod_bench",
                                                "amount": 1000, "currency": "usd",
                                                "interval": "month"}, (200, 409))
        queue = iter(range(customers))

        async def worker():
            for i in queue:
                if i >= subscribed:
                    await post(session, base, "/v1/customers", {"email": f"c{i}@example.com"})
                    continue
                customer = await post(session, base, "/v1/customers", {
                    "payment_method": "pm_card_visa",
                    "invoice_settings": {"default_payment_method": "pm_card_visa"}})
                await post(session, base, "/v1/subscriptions", {
                    "customer": customer["id"], "items": [{"plan": "price_bench"}]})

        await asyncio.gather(*(worker() for _ in range(concurrency)))


asyncio.run(main())
