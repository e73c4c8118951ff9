"""The secure deployment on loopback: a SuperLink with TLS and SuperNode authentication behind `fedpt gate`, devices
and the operator presenting certificates. Who gets in, who does not."""

import datetime
import ipaddress
import json
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from flower_processes import BIN, env, flwr_json, free_ports, start, stop, wait_for_run

from fedpt.federation.mtls import allowed
from fedpt.federation.run_folder import read_metrics

APP = Path(__file__).parents[2] / "flower"


@pytest.mark.parametrize("api, method, path, query, ok", [
    ("fleet", "POST", b"/v1/fleet/pull-messages", b"", True),
    ("control", "POST", b"/v1/control/start-run", b"", True),
    ("fleet", "POST", b"/v1/control/start-run", b"", False),  # a device on the operator's API
    ("control", "POST", b"/v1/fleet/pull-messages", b"", False),
    ("fleet", "POST", b"/v1/fleet/../control/start-run", b"", False),  # httpx would resolve the dots
    ("fleet", "POST", b"/v1/fleet/%2e%2e/control/start-run", b"", False),
    ("fleet", "POST", b"/v1/fleet//pull-messages", b"", False),
    ("fleet", "POST", b"/v1/runtime/acquire-task", b"", False),  # the ServerApp's API stays on loopback
    ("fleet", "POST", b"/docs", b"", False),
    ("fleet", "GET", b"/v1/fleet/pull-messages", b"", False),
    ("fleet", "POST", b"/v1/fleet/pull-messages", b"x=1", False),
])
def test_each_listener_passes_on_only_its_own_api(api, method, path, query, ok):
    assert allowed(api, method, path, query) is ok


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(folder, stem, key, cert):
    (folder / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    (folder / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _ca(folder, stem):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(stem)).issuer_name(_name(stem))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write(folder, stem, key, cert)
    return key, cert


def _leaf(folder, stem, ca, server):
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(stem)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    _write(folder, stem, key, builder.sign(ca_key, hashes.SHA256()))


def _node_key(folder, stem):
    """A SuperNode's key pair, as `ssh-keygen -t ecdsa -b 384` makes it."""
    key = ec.generate_private_key(ec.SECP384R1())
    (folder / stem).write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                  serialization.NoEncryption()))
    (folder / f"{stem}.pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                       serialization.PublicFormat.OpenSSH))


def _answer(port, folder, cert=None, head=b""):
    """The first bytes of the gate's HTTP answer; none when it refused the TLS session."""
    context = ssl.create_default_context(cafile=folder / "ca.crt")
    if cert:
        context.load_cert_chain(folder / f"{cert}.crt", folder / f"{cert}.key")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"POST /v1/fleet/get-run HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n" + head + b"\r\n")
            try:
                return tls.recv(64)  # TLS 1.3 settles the client's certificate after the handshake
            except (ssl.SSLError, ConnectionError):
                return b""


def test_gate_refuses_a_superlink_off_loopback(tmp_path):
    result = subprocess.run([str(BIN / "fedpt"), "gate", "--superlink", "10.0.0.1:9100", "--superlink-ca", "ca.crt",
                             "--cert", "s.pem", "--key", "s.key", "--fleet", "0.0.0.0:9092", "--device-ca", "d.crt"],
                            capture_output=True, text=True, env=env(tmp_path), timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "fedpt: error: the SuperLink must listen on loopback only, behind the gate; " \
                                    "got 10.0.0.1:9100"


def test_supernode_launcher_needs_a_certificate(tmp_path):
    result = subprocess.run([str(BIN / "fedpt-supernode"), "--superlink", "127.0.0.1:9"], capture_output=True,
                            text=True, env={**env(tmp_path), "FEDPT_CLIENT_CERT": "", "FEDPT_CLIENT_KEY": ""},
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("fedpt-supernode: error: fedpt-supernode needs --client-cert and --client-key")


def _wait(check, what, processes, timeout=60):
    deadline = time.time() + timeout
    while True:
        for p in processes:
            assert p.poll() is None, f"{p.args[0]} died while waiting for {what}"
        try:
            if check():
                return
        except OSError:
            pass
        assert time.time() < deadline, f"gave up waiting for {what}"
        time.sleep(0.3)


def _statuses(listing):
    assert listing.get("success"), listing
    return {str(n["node-id"]): n["status"] for n in listing["nodes"]}


@pytest.mark.slow
def test_only_credentials_get_through_the_gate(tiny, tmp_path):
    pki = tmp_path / "pki"
    pki.mkdir()
    _leaf(pki, "server", _ca(pki, "ca"), server=True)
    devices = _ca(pki, "devices-ca")
    _leaf(pki, "device", devices, server=False)
    _leaf(pki, "operator", _ca(pki, "operators-ca"), server=False)
    _leaf(pki, "stranger", _ca(pki, "stranger-ca"), server=False)
    for stem in ("node0", "node1", "node2", "intruder"):
        _node_key(pki, stem)
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what is your name {i}", "response": f"my name is fedpt {i}"})
                            + "\n" for i in range(16)))
    link, fleet, control, *node_ports = free_ports(6)
    processes = []
    try:
        superlink = start([str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(pki / "ca.crt"),
                           "--ssl-certfile", str(pki / "server.crt"), "--ssl-keyfile", str(pki / "server.key"),
                           "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                           "--host", "127.0.0.1", "--port", str(link)], tmp_path / "link", tmp_path / "link.log")
        gate = start([str(BIN / "fedpt"), "gate", "--superlink", f"127.0.0.1:{link}",
                      "--superlink-ca", str(pki / "ca.crt"), "--cert", str(pki / "server.crt"),
                      "--key", str(pki / "server.key"), "--fleet", f"127.0.0.1:{fleet}",
                      "--device-ca", str(pki / "devices-ca.crt"), "--control", f"127.0.0.1:{control}",
                      "--operator-ca", str(pki / "operators-ca.crt")], tmp_path / "gate", tmp_path / "gate.log")
        processes += [superlink, gate]
        https = ssl.create_default_context(cafile=pki / "ca.crt")
        _wait(lambda: urllib.request.urlopen(f"https://127.0.0.1:{link}/health", timeout=2, context=https).status
              == 200, "the SuperLink", processes)
        _wait(lambda: _answer(fleet, pki, "device") and _answer(control, pki, "operator"),
              "the gate", processes)

        # A request head over 64 KiB: 431, never read whole nor passed on
        assert _answer(fleet, pki, "device", head=b"x-big: " + b"a" * 70_000 + b"\r\n").startswith(b"HTTP/1.1 431")

        # No client certificate, a stranger's, or a device's on the operator's listener: no TLS session at all
        for port, cert in ((fleet, None), (control, None), (fleet, "stranger"), (control, "stranger"),
                           (control, "device")):
            assert _answer(port, pki, cert) == b"", (port, cert)

        cli = tmp_path / "cli"
        cli.mkdir()
        (cli / "config.toml").write_text(
            f'[superlink]\ndefault = "gate"\n\n'
            f'[superlink.gate]\naddress = "127.0.0.1:{control}"\nroot-certificates = "{pki / "ca.crt"}"\n\n'
            f'[superlink.fleetdoor]\naddress = "127.0.0.1:{fleet}"\nroot-certificates = "{pki / "ca.crt"}"\n')
        operator = ["--client-cert", str(pki / "operator.crt"), "--client-key", str(pki / "operator.key")]
        device = ["--client-cert", str(pki / "device.crt"), "--client-key", str(pki / "device.key")]
        overrides = (f'out="{tmp_path / "run"}" model.small="{tiny["small"]}" data.source="{data}" '
                     'federation.clients=1 federation.rounds=1 federation.eval_examples=2 tuning.dtype="float32" '
                     'tuning.local_steps=2 tuning.batch_size=2 tuning.max_length=32 data.test_percent=20')

        # Registering a key or submitting a run: refused without the operator's certificate
        intruder = str(pki / "intruder.pub")
        assert not flwr_json(["supernode", "register", intruder, "gate"], cli).get("success")
        assert not flwr_json(["run", str(APP), "gate", "--run-config", overrides], cli).get("success")
        for connection in ("gate", "fleetdoor"):  # a device's certificate: wrong CA, then wrong API
            assert not flwr_json([*device, "supernode", "register", intruder, connection], cli,
                                 program="fedpt-flwr").get("success")
        # ... and granted with it
        ids = {}
        for stem in ("node0", "node2"):
            registered = flwr_json([*operator, "supernode", "register", str(pki / f"{stem}.pub"), "gate"], cli,
                                   program="fedpt-flwr")
            assert registered.get("success"), registered
            ids[stem] = str(registered["node-id"])
        listing = flwr_json([*operator, "supernode", "ls", "gate"], cli, program="fedpt-flwr")
        assert set(_statuses(listing)) == set(ids.values())  # the intruder's key is not among them

        def supernode(program, key, port, credentials):
            return start([str(BIN / program), *credentials, "--root-certificates", str(pki / "ca.crt"),
                          "--superlink", f"127.0.0.1:{fleet}", "--auth-supernode-private-key", str(pki / key),
                          "--host", "127.0.0.1", "--port", str(port), "--max-retries", "3",
                          "--node-config", "partition-id=0 num-partitions=1"],
                         tmp_path / key, tmp_path / f"{key}.log")

        unregistered = supernode("fedpt-supernode", "node1", node_ports[1], device)  # a device cert, unknown key
        without_cert = supernode("flower-supernode", "node2", node_ports[2], [])  # a registered key, no cert
        processes += [unregistered, without_cert]
        assert unregistered.wait(timeout=120) != 0
        assert "Failed to activate" in (tmp_path / "node1.log").read_text()
        assert without_cert.wait(timeout=120) != 0
        assert "could not establish a connection" in (tmp_path / "node2.log").read_text()
        good = supernode("fedpt-supernode", "node0", node_ports[0], device)
        processes.append(good)

        submitted = flwr_json([*operator, "run", str(APP), "gate", "--run-config", overrides], cli,
                              program="fedpt-flwr")
        assert submitted.get("success"), submitted
        status, run = wait_for_run(submitted["run-id"], "gate", cli, [superlink, gate, good], program="fedpt-flwr",
                                   flags=operator)
        assert status == "finished:completed", run.get("status-details")
        assert [r["round"] for r in read_metrics(tmp_path / "run")] == [0, 1]

        statuses = _statuses(flwr_json([*operator, "supernode", "ls", "gate"], cli, program="fedpt-flwr"))
        assert statuses[ids["node0"]] == "online"
        assert statuses[ids["node2"]] == "registered", statuses  # its key is known, but it never got past the gate
    finally:
        stop(processes)
