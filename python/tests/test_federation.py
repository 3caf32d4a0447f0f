"""Federations from Python: declarations (validation errors name the key), provisioning with
`cosilo federation local` (keys stay in each member's folder), the provisioned Mosquitto with
mutual TLS, a site's session held, and the observer connected read-only."""

import os
import time

import pytest

import cosilo

DECL = """
[federation]
name = "py"

[strategy]
kind = "fedavg"
rounds = 2

[broker]
kind = "mosquitto"
host = "localhost"
port = {port}

[[site]]
id = "h1"

[[site]]
id = "h2"

[[observer]]
id = "notebook"
"""


def test_declarations_parse_and_mistakes_name_the_key(tmp_path):
    d = cosilo.Declaration.parse(DECL.format(port=18883))
    assert d.name == "py" and d.sites == ["h1", "h2"] and d.observers == ["notebook"]
    assert d.strategy == "fedavg" and d.rounds == 2 and d.security == "mtls"
    assert d.broker_kind == "mosquitto" and d.broker_port == 18883
    assert cosilo.Declaration.parse(d.to_toml()).sites == d.sites
    with pytest.raises(cosilo.CosiloError, match=r"strategy\.rounds"):
        cosilo.Declaration.parse(DECL.format(port=1).replace("rounds = 2", "rounds = 0"))
    with pytest.raises(cosilo.CosiloError, match="twice"):
        cosilo.Declaration.parse(DECL.format(port=1).replace('id = "h2"', 'id = "h1"'))
    path = tmp_path / "f.toml"
    with pytest.raises(cosilo.CosiloError, match="plain TCP"):
        cosilo.declare(path, "x", ["h1"], broker="embedded", security="mtls")
    assert not path.exists(), "an invalid declaration must not be written"
    d = cosilo.declare(path, "x", ["h1", "h2"], broker="embedded", security="none",
                       strategy={"kind": "braintorrent", "rounds": 3})
    assert d.strategy == "braintorrent" and cosilo.Declaration.load(path).sites == ["h1", "h2"]


def test_provision_start_the_broker_and_observe(tmp_path):
    port = cosilo.federation.free_port()
    decl = tmp_path / "federation.toml"
    decl.write_text(DECL.format(port=port))
    fed = cosilo.Federation.provision(decl, tmp_path / "fed")
    try:
        for s in ["h1", "h2"]:
            folder = fed.site_folder(s)
            assert (folder / "site.toml").exists() and (folder / f"{s}.crt").exists()
            assert oct(os.stat(folder / "tls.key").st_mode & 0o777) == "0o600"
            assert not (fed.operator / "kits" / s / "tls.key").exists()
        fed.start_broker()
        cosilo.hold_session(fed.site_folder("h1"))
        watch = fed.observe()
        deadline = time.monotonic() + 20
        kinds = []
        while time.monotonic() < deadline and "connected" not in kinds:
            kinds += [e["kind"] for e in watch.poll(timeout=1.0)]
        assert "connected" in kinds, kinds
        watch.close()
        # A folder without a kit is not a member.
        with pytest.raises(cosilo.CosiloError):
            cosilo.Observer(tmp_path)
    finally:
        fed.stop()
