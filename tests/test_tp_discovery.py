"""Peer discovery (edge_runtime/tp/discovery.py): DNS-SD over real multicast DNS between two network
namespaces, plus the record parsing and trust rules on their own.

The network tests make two namespaces joined by a veth pair (10.77.0.1/24 advertises, 10.77.0.2/24
discovers), with loopback up and a 224.0.0.0/4 route on each side. Advertisers run as one
subprocess in the first namespace (`_ADVERTISE`, reading a JSON list of records; zeroconf's own
ServiceInfo plays the malformed ones), and each discover() runs as a subprocess in the second that
prints its peers, error and log lines as JSON (the test process itself stays in the root namespace).
Namespaces are named after this process's pid and always deleted. They need root and iproute2;
without them these tests are skipped, saying which is missing.
"""
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from hypothesis import given, settings, strategies as st

from edge_runtime.tp.discovery import (Advertisement, PeerRecord, RefusedRecord, TrustPolicy, browse, discover,
                                       encode_txt, load_known_keys, parse_record)

ROOT = Path(__file__).resolve().parents[1]
ADVERTISER, DISCOVERER = "10.77.0.1", "10.77.0.2"
MODEL, OTHER_MODEL, TOFU_MODEL = "5eed0001", "0dd0beef", "70f0"
PROFILE = {"name": "raspberry-pi-5", "memory_bandwidth_gbs": 17.1, "memory_bytes": 8 << 30}


def keypair_public() -> bytes:
    return zmq.curve_keypair()[0]


KEYS = {name: keypair_public() for name in ("good-1", "good-2", "good-3", "stranger", "other-model", "bad-profile")}

# ---------------------------------------------------------------- parsing and trust (no network)


def txt_bytes(key=KEYS["good-1"], profile=PROFILE, model=MODEL) -> dict:
    return {k.encode(): v.encode() for k, v in encode_txt(key, profile, model).items()}


def test_a_record_round_trips():
    peer = parse_record("kitchen-pi", 29600, ["127.0.0.1", "10.0.0.7"], txt_bytes())
    assert peer == PeerRecord("kitchen-pi", "10.0.0.7", 29600, KEYS["good-1"], PROFILE, MODEL)
    assert parse_record("p", 1, ["10.0.0.7"], txt_bytes(key=None)).key is None


@pytest.mark.parametrize("change, reason", [
    ({b"v": b"2"}, "v=2 is not the version"),
    ({b"key": b"short"}, "40-character Z85"),
    ({b"key": b" " * 40}, "not valid Z85"),
    ({b"key": None}, "40-character Z85"),
    ({b"profile": b"{not json"}, "profile= is not JSON"),
    ({b"profile": b"[1]"}, "not a JSON object"),
    ({b"profile": b'{"name":"x","memory_bandwidth_gbs":0,"memory_bytes":1}'}, "memory_bandwidth_gbs must be"),
    ({b"profile": b'{"name":"x","memory_bandwidth_gbs":1,"memory_bytes":1.5}'}, "memory_bytes must be"),
    ({b"profile": b'{"memory_bandwidth_gbs":1,"memory_bytes":1}'}, "profile.name"),
    ({b"model": b"NOT-HEX"}, "model= is not"),
    ({b"model": b"\xff"}, "not UTF-8"),
])
def test_a_malformed_txt_is_refused_with_its_reason(change, reason):
    with pytest.raises(RefusedRecord, match=reason):
        parse_record("p", 29600, ["10.0.0.7"], {**txt_bytes(), **change})


@pytest.mark.parametrize("name, port, addresses, reason", [
    ("p", 0, ["10.0.0.7"], "port 0 is not in 1..65535"),
    ("p", None, ["10.0.0.7"], "port None"),
    ("p", 29600, ["fe80::1", "pi.local"], "no IPv4 address"),
    ("two words", 29600, ["10.0.0.7"], "instance name"),
])
def test_a_bad_port_address_or_name_is_refused(name, port, addresses, reason):
    with pytest.raises(RefusedRecord, match=reason):
        parse_record(name, port, addresses, txt_bytes())


def test_missing_txt_fields_are_named():
    for field in (b"v", b"model", b"profile"):
        properties = txt_bytes()
        del properties[field]
        with pytest.raises(RefusedRecord, match=f"TXT has no {field.decode()}="):
            parse_record("p", 29600, ["10.0.0.7"], properties)


FIELD = st.sampled_from([b"v", b"key", b"model", b"profile", b"x", b""])
VALUE = st.one_of(st.none(), st.binary(max_size=300), st.sampled_from(list(txt_bytes().values())),
                  st.text(max_size=60).map(str.encode),
                  st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                               lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                                   st.sampled_from(["name", "memory_bandwidth_gbs", "memory_bytes", "z"]), inner),
                               max_leaves=8).map(lambda value: json.dumps(value).encode()))


@settings(max_examples=400, deadline=None)
@given(name=st.one_of(st.text(max_size=70), st.sampled_from(["p", "kitchen-pi"])),
       port=st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5)),
       addresses=st.lists(st.one_of(st.text(max_size=16), st.ip_addresses().map(str), st.integers()), max_size=3),
       properties=st.dictionaries(FIELD, VALUE, max_size=6))
def test_garbage_is_only_ever_refused(name, port, addresses, properties):
    try:
        peer = parse_record(name, port, addresses, properties)
    except RefusedRecord as err:
        assert str(err)
        return
    assert isinstance(peer, PeerRecord) and 1 <= peer.port <= 65535 and peer.profile["memory_bandwidth_gbs"] > 0


def record(name="good-1", key=KEYS["good-1"]) -> PeerRecord:
    return PeerRecord(name, "10.0.0.7", 29600, key, PROFILE, MODEL)


def test_trust_pinned_required_and_insecure():
    assert TrustPolicy(pinned={KEYS["good-1"]}).refusal(record()) is None
    assert "not pinned" in TrustPolicy(pinned={KEYS["good-2"]}).refusal(record())
    assert "no CURVE key" in TrustPolicy(pinned={KEYS["good-1"]}).refusal(record(key=None))
    assert "no key is trusted" in TrustPolicy().refusal(record())
    assert TrustPolicy(require_key=False).refusal(record(key=None)) is None
    assert TrustPolicy(require_key=False).refusal(record()) is None


def test_trust_on_first_use_records_then_refuses_a_changed_key(tmp_path):
    known = tmp_path / "keys" / "known_peers"
    with pytest.raises(ValueError, match="needs known_keys"):
        TrustPolicy(trust_on_first_use=True)
    assert "not pinned" in TrustPolicy(known_keys=known).refusal(record())
    assert TrustPolicy(known_keys=known, trust_on_first_use=True).refusal(record()) is None
    assert known.read_text() == f"good-1 {KEYS['good-1'].decode()}\n" and known.stat().st_mode & 0o777 == 0o600
    assert TrustPolicy(known_keys=known).refusal(record()) is None
    assert "key changed" in TrustPolicy(known_keys=known, trust_on_first_use=True).refusal(record(key=KEYS["good-2"]))
    assert load_known_keys(known) == {"good-1": KEYS["good-1"]}


def test_a_bad_known_keys_line_is_named(tmp_path):
    known = tmp_path / "known_peers"
    known.write_text("# peers\n\nkitchen-pi only-one-field\n")
    with pytest.raises(ValueError, match="known_peers:3: expected `NAME KEY`"):
        load_known_keys(known)


@pytest.mark.parametrize("kwargs, reason", [
    (dict(name="two words"), "instance name"),
    (dict(port=70000), "port 70000"),
    (dict(model="XYZ"), "model= is not"),
    (dict(key=b"short"), "40-character Z85"),
    (dict(profile={**PROFILE, "notes": "x" * 300}), "over the DNS-SD limit of 255"),
    (dict(profile={**PROFILE, "memory_bytes": 0}), "memory_bytes must be"),
    (dict(profile={"f": object()}), "not JSON-serialisable"),
])
def test_an_advertisement_that_discover_would_refuse_is_a_value_error(kwargs, reason):
    args = dict(name="p", port=29600, key=KEYS["good-1"], profile=PROFILE, model=MODEL, addresses=["10.0.0.7"])
    args.update(kwargs)
    with pytest.raises(ValueError, match=reason):
        Advertisement(args.pop("name"), args.pop("port"), **args)


def test_discover_checks_its_arguments():
    with pytest.raises(ValueError, match="count must be"):
        discover(0, 1.0)
    with pytest.raises(ValueError, match="timeout_s must be"):
        discover(1, 0)
    with pytest.raises(ValueError, match="browse: timeout_s must be"):
        browse(0)

# ---------------------------------------------------------------- two namespaces, real multicast DNS


_ADVERTISE = """
import json, sys, threading
from zeroconf import IPVersion, ServiceInfo, Zeroconf
from edge_runtime.tp.discovery import SERVICE, Advertisement
opened, errors = [], []
def start(peer):
    try:
        if "raw" in peer:
            zc = Zeroconf(ip_version=IPVersion.V4Only)
            opened.append(zc)
            zc.register_service(ServiceInfo(SERVICE, peer["name"] + "." + SERVICE, port=peer["port"],
                                            properties=peer["raw"], parsed_addresses=peer["addresses"]))
        else:
            key = peer["key"].encode() if peer["key"] else None
            opened.append(Advertisement(peer["name"], peer["port"], key=key, profile=peer["profile"],
                                        model=peer["model"], addresses=peer["addresses"]))
    except Exception as err:
        errors.append(peer["name"] + ": " + repr(err))
threads = [threading.Thread(target=start, args=(peer,)) for peer in json.loads(sys.argv[1])]
[thread.start() for thread in threads]
[thread.join() for thread in threads]
print(json.dumps(errors), flush=True)
sys.stdin.read()
closing = [threading.Thread(target=each.close) for each in opened]  # goodbyes, ~0.75 s each
[thread.start() for thread in closing]
[thread.join() for thread in closing]
"""

_DISCOVER = """
import json, sys, time
from pathlib import Path
from edge_runtime.tp.discovery import discover
args, lines = json.loads(sys.argv[1]), []
pinned = {key.encode() for key in args.pop("pinned", [])}
known = Path(args.pop("known_keys")) if "known_keys" in args else None
began, peers, error = time.monotonic(), [], None
try:
    peers = [dict(vars(peer), key=peer.key and peer.key.decode())
             for peer in discover(**args, pinned=pinned, known_keys=known, log=lines.append)]
except Exception as err:
    error = type(err).__name__ + ": " + str(err)
print(json.dumps({"peers": peers, "error": error, "log": lines, "elapsed": time.monotonic() - began}))
"""


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if done.returncode:
        raise OSError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


class Lan:
    """Two namespaces on one veth link: `advertise` runs in one, `discover` in the other."""

    def __init__(self, tag: str):
        self.advertising, self.discovering = f"{tag}a", f"{tag}b"

    def command(self, namespace: str, script: str, argument) -> list[str]:
        return ["ip", "netns", "exec", namespace, sys.executable, "-c", script, json.dumps(argument)]

    def advertise(self, peers: list[dict]) -> subprocess.Popen:
        proc = subprocess.Popen(self.command(self.advertising, _ADVERTISE, peers), cwd=ROOT, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if not select.select([proc.stdout], [], [], 30)[0]:
            stop(proc)
            raise TimeoutError("the advertiser did not register within 30 s")
        assert json.loads(proc.stdout.readline()) == [], "an advertisement failed to register"
        return proc

    def discover(self, **args) -> dict:
        done = subprocess.run(self.command(self.discovering, _DISCOVER, args), cwd=ROOT, text=True,
                              capture_output=True, timeout=args["timeout_s"] + 20)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


def stop(proc: subprocess.Popen) -> None:
    """Close the advertiser's stdin (it unregisters and exits); kill it if it lingers."""
    try:
        proc.stdin.close()
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _why_no_namespaces() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (`ip netns add`); this test runs unprivileged"
    if shutil.which("ip") is None:
        return "iproute2 is not installed (no `ip` command), so no network namespaces can be made"
    return None


@pytest.fixture(scope="module")
def lan():
    reason = _why_no_namespaces()
    if reason:
        pytest.skip(reason)
    tag = f"efd{os.getpid()}"
    lan, made = Lan(tag), []
    try:
        try:
            for namespace in (lan.advertising, lan.discovering):
                ip("netns", "add", namespace)
                made.append(namespace)
            # each end of the veth pair is named after the namespace it moves into
            ip("link", "add", lan.advertising, "type", "veth", "peer", "name", lan.discovering)
            for namespace, address in ((lan.advertising, ADVERTISER), (lan.discovering, DISCOVERER)):
                ip("link", "set", namespace, "netns", namespace)
                ip("-n", namespace, "addr", "add", f"{address}/24", "dev", namespace)
                ip("-n", namespace, "link", "set", "lo", "up")
                ip("-n", namespace, "link", "set", namespace, "up", "multicast", "on")
                ip("-n", namespace, "route", "add", "224.0.0.0/4", "dev", namespace)
        except OSError as err:
            pytest.skip(f"cannot make network namespaces here: {err}")
        yield lan
    finally:
        subprocess.run(["ip", "link", "del", lan.advertising], capture_output=True)  # if it never moved
        for namespace in made:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def peer(name: str, port: int, model: str = MODEL, **fields) -> dict:
    profile = {"name": f"board-{name}", "memory_bandwidth_gbs": 4.5 + port % 10, "memory_bytes": (1 + port % 10) << 30}
    key = KEYS.get(name)
    return {"name": name, "port": port, "key": key and key.decode(), "profile": profile, "model": model,
            "addresses": [ADVERTISER], **fields}


def good_txt(**change) -> dict:
    return {**encode_txt(KEYS["bad-profile"], PROFILE, MODEL), **change}


WORLD = [peer("good-1", 29601), peer("good-2", 29602), peer("good-3", 29603), peer("stranger", 29604),
         peer("keyless", 29605), peer("other-model", 29606, model=OTHER_MODEL),
         peer("bad-key", 29607, raw=good_txt(key="not-a-z85-key")),
         peer("bad-profile", 29608, raw=good_txt(profile="{not json"))]
GOOD = ["good-1", "good-2", "good-3"]


@pytest.fixture(scope="module")
def world(lan):
    proc = lan.advertise(WORLD)
    yield lan
    stop(proc)


def test_discovers_exactly_the_advertised_peers(world):
    got = world.discover(count=3, timeout_s=15, model=MODEL, pinned=[KEYS[name].decode() for name in GOOD])
    assert got["error"] is None, got
    expected = [entry for entry in WORLD if entry["name"] in GOOD]
    assert got["peers"] == [{"name": entry["name"], "host": ADVERTISER, "port": entry["port"], "key": entry["key"],
                             "profile": entry["profile"], "model": MODEL} for entry in expected]


@pytest.fixture(scope="module")
def short_of_peers(world) -> dict:
    """discover(4) with three good peers pinned, and two more pinned keys on peers that fail otherwise."""
    pinned = [KEYS[name].decode() for name in (*GOOD, "other-model", "bad-profile")]
    return world.discover(count=4, timeout_s=6, model=MODEL, pinned=pinned)


def refusal(run: dict, name: str) -> str:
    lines = [line for line in run["log"] if line.startswith(f"discover: refused {name}: ")]
    assert len(lines) == 1, run["log"]
    return lines[0]


def test_an_unpinned_key_is_refused_while_pinned_ones_are_accepted(short_of_peers):
    assert "is not pinned" in refusal(short_of_peers, "stranger")
    assert "no CURVE key" in refusal(short_of_peers, "keyless")
    assert not any(name in line for line in short_of_peers["log"] for name in GOOD)


def test_malformed_records_are_refused_and_good_ones_still_found(short_of_peers):
    assert "key= is not a 40-character Z85" in refusal(short_of_peers, "bad-key")
    assert "profile= is not JSON" in refusal(short_of_peers, "bad-profile")
    assert "found 3 of 4 peers" in short_of_peers["error"]


def test_a_model_mismatch_is_skipped(short_of_peers):
    assert f"holds model {OTHER_MODEL}, not {MODEL}" in refusal(short_of_peers, "other-model")


def test_the_timeout_names_what_was_found_and_refused(short_of_peers):
    error = short_of_peers["error"]
    assert error.startswith("TimeoutError: discover: found 3 of 4 peers within 6 s (good-1, good-2, good-3); refused ")
    for name in ("bad-key", "bad-profile", "keyless", "other-model", "stranger"):
        assert f"{name} (" in error


def test_insecure_accepts_keyed_and_keyless_peers(world):
    got = world.discover(count=5, timeout_s=15, model=MODEL, require_key=False)
    assert got["error"] is None, got
    assert [each["name"] for each in got["peers"]] == [*GOOD, "keyless", "stranger"]
    assert got["peers"][3]["key"] is None


def test_trust_on_first_use_records_a_key_then_refuses_a_changed_one(world, tmp_path):
    known = tmp_path / "known_peers"
    first, second = keypair_public(), keypair_public()
    proc = world.advertise([peer("tofu-peer", 29700, model=TOFU_MODEL, key=first.decode())])
    try:
        got = world.discover(count=1, timeout_s=15, model=TOFU_MODEL, known_keys=str(known),
                             trust_on_first_use=True)
        assert [each["name"] for each in got["peers"]] == ["tofu-peer"], got
        assert known.read_text() == f"tofu-peer {first.decode()}\n" and known.stat().st_mode & 0o777 == 0o600
        again = world.discover(count=1, timeout_s=15, model=TOFU_MODEL, known_keys=str(known))
        assert [each["name"] for each in again["peers"]] == ["tofu-peer"], again
    finally:
        stop(proc)
    proc = world.advertise([peer("tofu-peer", 29700, model=TOFU_MODEL, key=second.decode())])
    try:
        changed = world.discover(count=1, timeout_s=5, model=TOFU_MODEL, known_keys=str(known),
                                 trust_on_first_use=True)
    finally:
        stop(proc)
    assert "key changed" in refusal(changed, "tofu-peer")
    assert changed["error"].startswith("TimeoutError: discover: found 0 of 1 peers") and "key changed" in changed["error"]
    assert known.read_text() == f"tofu-peer {first.decode()}\n"


# ---------------------------------------------------------------- a group over discovered peers


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random tiny Llama (8 / 4 heads) and transformers' greedy ids after [5, 77, 31]."""
    import torch
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, max_position_embeddings=64, initializer_range=0.2, hidden_size=64,
                                   intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=4)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("discovered-model")
    hf.save_pretrained(path, safe_serialization=True)
    prompt = torch.tensor([[5, 77, 31]])
    with torch.no_grad():
        ids = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    return path, ids[0, 3:].tolist()


def test_a_group_forms_over_discovered_peers_and_refuses_an_unpinned_key(lan, tiny_model, tmp_path):
    """Real `tp worker --advertise` peers in one namespace, `tp generate --discover` in the other, with
    CURVE keys: the two peers holding worker.key form the group (greedy ids equal transformers'); a
    third advertising another key is refused, so asking for three times out naming it."""
    from edge_runtime.tp.curve import make_keys
    keys, foreign = make_keys(tmp_path / "keys"), make_keys(tmp_path / "foreign")
    model, expected = tiny_model
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs, logs = [], []
    for name, port, folder in (("pi-a", 29611, keys), ("pi-b", 29612, keys), ("intruder", 29613, foreign)):
        logs.append(tmp_path / f"{name}.log")
        with open(logs[-1], "wb") as log:
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", lan.advertising, sys.executable, "-m", "edge_runtime.cli", "tp", "worker",
                 "--model", str(model), "--listen", f"{ADVERTISER}:{port}", "--advertise", name, "--curve-keys",
                 str(folder), "--cache-dir", str(tmp_path / f"cache-{name}")],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))

    def generate(count: int, timeout_s: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", "netns", "exec", lan.discovering, sys.executable, "-m", "edge_runtime.cli", "tp", "generate",
             "--model", str(model), "--discover", str(count), "--discover-timeout-s", str(timeout_s),
             "--master", f"{DISCOVERER}:29650", "--curve-keys", str(keys), "--prompt-ids", "5,77,31",
             "--max-new-tokens", "8", "--ignore-eos", "--cache-dir", str(tmp_path / "cache-master"), "--json"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)

    try:
        for proc, log in zip(procs, logs):
            deadline = time.monotonic() + 90
            while "advertised on the local network" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        done = generate(2, 15)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["token_ids"] == expected and result["world_size"] == 3
        assert result["group"]["members"][1:] == ["pi-a", "pi-b"]
        short = generate(3, 5)
        assert short.returncode == 1
        assert "found 2 of 3 peers" in short.stderr and "intruder (" in short.stderr and "not pinned" in short.stderr
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


_LATE_PEER = """
import json, os, signal, subprocess, sys, time
from pathlib import Path
from edge_runtime.tp.config import TPConfig
from edge_runtime.tp.group import Discovery, Group
from edge_runtime.tp.launch import free_port
model, cache = sys.argv[1], Path(sys.argv[2])
env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
def peer(name):
    log = cache / (name + ".log")
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "tp", "worker", "--model", model, "--listen",
                             f"127.0.0.1:{free_port()}", "--advertise", name, "--cache-dir", str(cache)],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 90
    while "advertised on the local network" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    return proc
procs = [peer("late-a"), peer("late-b")]
logs = []
group = Group(Path(model), Discovery(2, timeout_s=30), TPConfig(master=f"127.0.0.1:{free_port()}", timeout_s=1.0),
              cache_dir=cache, log=logs.append)
out = {"formed": group.describe()["members"]}
first = []
for tok in group.generate([5, 77, 31], 8):
    first.append(tok)
    if len(first) == 3:
        procs[1].kill()
out.update(first=first, after_loss=group.describe()["members"])
procs.append(peer("late-c"))
deadline = time.monotonic() + 60
while "late-c" not in group.describe()["returning"] and time.monotonic() < deadline:
    time.sleep(0.1)
out.update(second=list(group.generate([5, 77, 31], 8)), after_return=group.describe()["members"], log=logs)
group.close()
for p in procs:
    p.kill()
print(json.dumps(out))
"""


def test_a_discovered_group_takes_in_a_peer_advertised_later(lan, tiny_model, tmp_path):
    """discover = 2: one of the two peers dies mid-generation (no token lost, the group goes on with
    the other), then a third peer starts advertising: the group finds it and takes it in at the next
    request. Everything runs in one namespace (multicast looped back to its own processes)."""
    model, expected = tiny_model
    done = subprocess.run(["ip", "netns", "exec", lan.discovering, sys.executable, "-c", _LATE_PEER, str(model),
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["formed"][1:] == ["late-a", "late-b"]
    assert out["first"] == expected and out["after_loss"][1:] == ["late-a"]
    assert out["second"] == expected and out["after_return"][1:] == ["late-a", "late-c"], out["log"]
