"""Policies out: ``megavla.load_policy`` (in process) and ``megavla serve`` (openpi websocket protocol).

wire.py (safe msgpack-numpy) · schema.py (observation keys -> model inputs) · policy.py
(LoadedPolicy.infer / infer_batch) · server.py (asyncio websocket server, batching) · admission.py
(connection limits, idle eviction) · cli.py.
"""
