"""`megavla serve` driven by the real openpi-client: round trip, batching, bad requests, API key,
size caps, and in-process == over-the-wire actions (one step and whole closed-loop episodes).

One server subprocess (`python -m megavla.cli serve`, port from the OS, 127.0.0.1 only) on a tiny
random export serves the whole module; its log (stderr) is checked for the one-line-per-error rule.
"""
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import msgpack
import numpy as np
import pytest

pytest.importorskip("openpi_client")
from openpi_client import msgpack_numpy  # noqa: E402
from openpi_client.websocket_client_policy import WebsocketClientPolicy  # noqa: E402
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402

import megavla  # noqa: E402
from helpers.observations import observation  # noqa: E402
from megavla.data_shards.hands import ARM_STATE_DIM as S  # noqa: E402  (robot/arm state dims)
from megavla.eval import cli as eval_cli  # noqa: E402
from megavla.eval import closed_loop  # noqa: E402
from megavla.eval.policy import VLAPolicy, load_checkpoint  # noqa: E402
from megavla.serving import wire  # noqa: E402
from megavla.serving.random_export import write_random_export  # noqa: E402

KEY = "test-key-123"
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return write_random_export(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    # A long batch wait: the 3-client test must batch even on a loaded machine; a lone client never
    # waits (the batch closes once every connected client has a request in it).
    cmd = [sys.executable, "-m", "megavla.cli", "serve", str(export), "--port", "0", "--api-key", KEY,
           "--max-message-mb", "1", "--batch-wait-ms", "10000", "--max-batch", "4"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()  # blocks until the server listens (or dies)
    if "ws://" not in line:
        proc.kill()
        pytest.fail(f"server did not start: {line!r}\n{log_path.read_text()}")
    port = int(line.rsplit(":", 1)[1].split()[0])
    yield {"port": port, "log": log_path, "proc": proc}
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=60) == 0  # SIGTERM: a clean stop
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture
def client(server):
    """Connect real openpi clients; all are closed after the test (an idle open connection would make
    the server wait out --batch-wait-ms for it on every batch)."""
    opened = []

    def connect(api_key=KEY):
        opened.append(WebsocketClientPolicy("127.0.0.1", server["port"], api_key=api_key))
        return opened[-1]
    yield connect
    for c in opened:
        c._ws.close()


def test_round_trip_with_openpi_client(server, client):
    c = client()
    meta = c.get_server_metadata()
    assert meta["preset"] == "tiny" and meta["embodiment"] == "robot/arm" and meta["chunk_length"] == 10
    assert meta["action_dim"] == 7 and meta["action_names"][-1] == "gripper"
    assert meta["cameras"] == ["head", "left_wrist", "right_wrist"] and meta["image_size"] == 32
    assert meta["observation_schema"]["state"] == "observation/state"
    assert meta["observation_schema"]["state_dim"] == S == len(meta["observation_schema"]["state_names"])
    out = c.infer(observation())
    assert out["actions"].shape == (10, 7) and out["actions"].dtype == np.float32
    assert np.isfinite(out["actions"]).all()
    timing = out["server_timing"]
    assert timing["batch_size"] == 1 and timing["total_ms"] >= timing["infer_ms"] > 0
    # Nested maps are flattened with "/": the same observation in openpi's nested form works too.
    obs = observation()
    nested = {"observation": {"images": {k.rsplit("/", 1)[1]: v for k, v in obs.items() if "images" in k},
                              "state": obs["observation/state"]}, "prompt": obs["prompt"]}
    assert c.infer(nested)["actions"].shape == (10, 7)
    assert "prev_total_ms" in c.infer(obs)["server_timing"]


def test_in_process_and_over_the_wire_actions_are_equal(server, client, export):
    local = megavla.load_policy(export, seed=0)  # server --seed 0: each connection starts the same stream
    c = client()
    for seed in (1, 2, 3):
        obs = observation(seed=seed, task=seed)
        np.testing.assert_array_equal(c.infer(obs)["actions"], local.infer(obs)["actions"])


def test_three_concurrent_clients_are_batched(client, export):
    clients = [client() for _ in range(3)]
    obs = [observation(seed=10 + i, task=i) for i in range(3)]
    barrier, out = threading.Barrier(3), [None] * 3

    def run(i):
        barrier.wait()
        out[i] = clients[i].infer(obs[i])
    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [o["server_timing"]["batch_size"] for o in out] == [3, 3, 3]
    # Each connection's first request uses the first noise draw of seed 0, batched or not.
    for i in range(3):
        alone = megavla.load_policy(export, seed=0).infer(obs[i])["actions"]
        np.testing.assert_allclose(out[i]["actions"], alone, rtol=0, atol=1e-5)


def _frame(obs):
    return msgpack_numpy.packb(obs)


def _raw_array(dtype, shape, data):
    return {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}


def _bad_requests():
    good = observation()
    head = "observation/images/head"

    def without(key):
        return _frame({k: v for k, v in good.items() if k != key})

    def replaced(key, value):
        return _frame({**good, key: value})

    def raw(key, value):  # a hand-made array map: the client's own packer refuses object arrays
        return msgpack.packb({**good, key: value}, default=msgpack_numpy.pack_array, use_bin_type=True)

    return {
        "missing state": (without("observation/state"), "missing key 'observation/state'"),
        "missing prompt": (without("prompt"), "missing key 'prompt'"),
        "state wrong shape": (replaced("observation/state", np.zeros(5, np.float32)), f"shape [5], expected [{S}]"),
        "state wrong dtype": (replaced("observation/state", np.zeros(S, np.int64)), "expected a float array"),
        "state NaN": (replaced("observation/state", np.full(S, np.nan, np.float32)), "NaN"),
        "image wrong dtype": (replaced(head, good[head].astype(np.float32)), "expected uint8"),
        "image CHW": (replaced(head, good[head].transpose(2, 0, 1).copy()), "looks like CHW"),
        "image too large": (replaced(head, np.zeros((4000, 8, 3), np.uint8)), "max_image_side"),
        "two cameras": (without(head), "wrong camera count"),
        "four cameras": (_frame({**good, "observation/images/extra": good[head]}), "wrong camera count"),
        "unknown key": (_frame({**good, "observation/joints": np.zeros(3)}), "unexpected key"),
        "prompt not text": (replaced("prompt", 3), "expected a string"),
        "prompt too long": (replaced("prompt", "x" * 1001), "max_prompt_chars"),
        "object array": (raw("prompt", _raw_array("|O", [1], b"\0" * 8)), "not allowed"),
        "structured dtype": (raw("prompt", _raw_array("i4,O", [1], b"\0" * 12)), "not allowed"),
        "shape lies": (raw("prompt", _raw_array("<f4", [1000, 1000], b"\0" * 16)), "needs 4000000 bytes"),
        "too many dims": (raw("prompt", _raw_array("|u1", [1] * 9, b"\0")), "at most 4"),
        "not msgpack": (b"\xc1garbage", "not a valid msgpack"),
        "not a map": (_frame([1, 2, 3]), "must be a map"),
        "text frame": ("hello", "binary msgpack"),
    }


def test_malformed_requests_get_an_error_and_the_connection_keeps_serving(server, client):
    c = client()
    good = observation()
    messages = []
    for name, (frame, expected) in _bad_requests().items():
        c._ws.send(frame)
        reply = c._ws.recv()
        assert isinstance(reply, str) and expected in reply, (name, reply)
        messages.append(reply.split("bad request: ", 1)[1])
    with pytest.raises(RuntimeError, match="state: shape \\[5\\]") as info:  # what the client raises
        c.infer({**good, "observation/state": np.zeros(5, np.float32)})
    messages.append(str(info.value).split("bad request: ", 1)[1])
    assert c.infer(good)["actions"].shape == (10, 7)
    log = server["log"].read_text().splitlines()
    for msg in set(messages):  # each error logged once per occurrence, with the client's address
        lines = [ln for ln in log if ln.endswith(f"bad request: {msg}")]
        assert len(lines) == messages.count(msg), msg
        assert all(" 127.0.0.1:" in ln for ln in lines), msg


def test_disconnect_mid_request_and_bad_client_do_not_affect_others(client):
    steady = client()
    rude = client()
    rude._ws.send(_frame(observation()))
    rude._ws.close()  # before its reply
    other = client()
    other._ws.send(b"\x00\x01")
    assert isinstance(other._ws.recv(), str)
    other._ws.close()  # (left open and idle, it would make the server wait --batch-wait-ms for it)
    assert steady.infer(observation())["actions"].shape == (10, 7)


def test_api_key_missing_or_wrong_is_refused(server, client):
    for key in (None, "wrong"):
        with pytest.raises(InvalidStatus, match="401"):
            client(api_key=key)
    log = server["log"].read_text()
    assert "connection refused: no API key" in log and "connection refused: wrong API key" in log
    # The health check needs no key and opens no websocket (what a supervisor or load balancer polls).
    with urllib.request.urlopen(f"http://127.0.0.1:{server['port']}/healthz", timeout=30) as reply:
        assert reply.status == 200 and reply.read() == b"OK\n"


def test_oversized_message_closes_only_that_connection(server, client):
    big = client()
    big._ws.send(_frame({"observation/state": np.zeros(2 << 20, np.uint8)}))  # 2 MiB > --max-message-mb 1
    with pytest.raises(ConnectionClosed) as info:
        big._ws.recv()
    assert info.value.rcvd.code == 1009
    assert client().infer(observation())["actions"].shape == (10, 7)
    time.sleep(0.2)
    assert "over the 1048576-byte limit" in server["log"].read_text()


def test_closed_loop_over_the_wire_equals_in_process(server, client, export, tmp_path):
    class Recording:
        def __init__(self, policy):
            self.policy, self.actions = policy, []

        def reset(self, world):
            self.policy.reset(world)

        def act(self, world):
            self.actions.append(self.policy.act(world))
            return self.actions[-1]

    combos, kw = ["0:0", "1:2"], dict(image_size=32, max_steps=7, progress=False)
    local = Recording(VLAPolicy(load_checkpoint(export), execute_k=3, num_steps=10, seed=0))
    c = client()
    remote = Recording(closed_loop.ClientPolicy(c, c.get_server_metadata(), execute_k=3))
    a = closed_loop.evaluate(local, combos, 1, **kw)
    b = closed_loop.evaluate(remote, combos, 1, **kw)
    assert a == b and len(local.actions) == 14
    np.testing.assert_array_equal(np.stack(local.actions), np.stack(remote.actions))
    c._ws.close()
    # The command-line form of the same comparison.
    url = f"ws://127.0.0.1:{server['port']}"
    args = ["--combos", "0:0", "--episodes-per-combo", "1", "--execute-k", "3", "--max-steps", "4"]
    assert eval_cli.main(["closed-loop", str(export), *args, "--out", str(tmp_path / "a.json")]) == 0
    assert eval_cli.main(["closed-loop", "--policy-server", url, "--api-key", KEY, *args,
                          "--out", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    a.pop("traces", None), b.pop("traces", None)  # (each run names its own traces file)
    assert a == b
    assert eval_cli.main(["closed-loop", "--policy-server", url, *args]) == 2  # no key: refused, exit 2


def test_wire_codec_matches_openpi_and_caps_sizes():
    obs = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.int64(3), "c": "text", "d": [1, 2]}
    decoded = wire.unpackb(msgpack_numpy.packb(obs))
    np.testing.assert_array_equal(decoded["a"], obs["a"])
    assert decoded["b"] == 3 and decoded["c"] == "text" and decoded["d"] == [1, 2]
    back = msgpack_numpy.unpackb(wire.packb({"actions": obs["a"], "x": np.float32(1.5)}))
    np.testing.assert_array_equal(back["actions"], obs["a"])
    assert back["x"] == np.float32(1.5)
    small = wire.Limits(max_array_bytes=100)
    with pytest.raises(wire.WireError, match="over the server's limit"):
        wire.unpackb(msgpack_numpy.packb(np.zeros(101, np.uint8)), small)
    with pytest.raises(wire.WireError, match="over the server's limit"):
        wire.unpackb(msgpack.packb(list(range(300))))  # max_items 256
    for dtype in ("|O", "<c8", "|V8", ">f4", "<M8[s]"):
        with pytest.raises(wire.WireError, match="not allowed"):
            wire.unpackb(msgpack.packb(_raw_array(dtype, [1], b"\0" * 8)))


def test_load_policy_and_serve_errors_name_the_problem(export, tmp_path, capsys):
    from megavla.serving import cli
    assert cli.main([str(tmp_path)]) == 2
    assert "model.safetensors" in capsys.readouterr().err  # (the wording is the checkpoint loader's)
    bad = tmp_path / "schema.yaml"
    bad.write_text("images: {wrist: cam0}\n")
    assert cli.main([str(export), "--schema", str(bad)]) == 2
    assert "cameras ['wrist']" in capsys.readouterr().err
    bad.write_text("imagez: {}\n")
    assert cli.main([str(export), "--schema", str(bad)]) == 2
    assert "Did you mean 'images'" in capsys.readouterr().err
    assert cli.main([str(export), "--print-schema"]) == 0
    assert "observation/images/head" in capsys.readouterr().out


def test_subtask_text_and_bf16_weights(export):
    # Asking for the subtask text does not change the actions (it is the one they were conditioned on).
    with_text = megavla.load_policy(export, subtask=True, flow_steps=2)
    assert with_text.model.actions_read_subtask
    np.testing.assert_allclose(with_text.infer(observation())["actions"],
                               megavla.load_policy(export, flow_steps=2).infer(observation())["actions"],
                               rtol=0, atol=1e-6)
    policy = megavla.load_policy(export, subtask=True, flow_steps=2, dtype="bf16")
    out = policy.infer(observation())
    assert isinstance(out["subtask"], str) and out["actions"].shape == (10, 7)
    assert out["actions"].dtype == np.float32 and np.isfinite(out["actions"]).all()
    meta = policy.metadata
    assert meta["subtask"] is True and meta["flow_steps"] == 2 and meta["dtype"] == "bf16"


def test_schema_file_renames_keys_optional_camera_and_ignored_keys(export, tmp_path):
    (tmp_path / "schema.yaml").write_text(
        "images: {head: cam/high, left_wrist: cam/left, right_wrist: cam/right}\n"
        "optional_cameras: [left_wrist]\nstate: qpos\nprompt: task\nignore_keys: [timestamp]\n")
    policy = megavla.load_policy(export, schema=tmp_path / "schema.yaml")
    obs = observation()
    renamed = {"cam/high": obs["observation/images/head"], "cam/right": obs["observation/images/right_wrist"],
               "qpos": obs["observation/state"], "task": obs["prompt"], "timestamp": 1.5}
    assert policy.infer(renamed)["actions"].shape == (10, 7)  # left wrist left out: seen as absent
    assert policy.metadata["observation_schema"]["optional_cameras"] == ["left_wrist"]
    with pytest.raises(ValueError, match="wrong camera count"):
        policy.infer({k: v for k, v in renamed.items() if k != "cam/high"})
