"""Security against the real stack: credentials out of logs, TLS, least privilege, access models.

The TLS stack is this module's own (a CA and server certificate made with the openssl CLI);
the session's default stack stays plain on loopback.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import slixmpp
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest
from django.test import Client, override_settings
from slixmpp.exceptions import IqError, IqTimeout

from scalepub import exitcodes
from scalepub.settings import Settings, SettingsError, env_mapping
from scalepub.xmpp.batch import Batch, Entry, entry_part, publish_iq
from scalepub.xmpp.link import Reply, XmppLink, XmppTlsError
from scalepub.xmpp.subscriber import ReceivedEntry, Subscriber
from tests.e2e import PoolProcess, create_nodes, settings_env, wait_until
from tests.stack import Stack, running
from tests.streams import drained, produce

pytestmark = pytest.mark.stack

CONNECT_S = 20.0


# -- helpers ------------------------------------------------------------------------------

def settings_of(stack: Stack, **overrides: Any) -> Settings:
    """The stack's settings under a fresh key prefix."""
    return Settings.from_mapping(env_mapping(stack.env), key_prefix=f"s{uuid.uuid4().hex[:8]}",
                                 shards=1, **overrides)


def one_entry_batch(node: str, seq: int = 1) -> Batch:
    batch = Batch(node, 0)
    part = entry_part(node=node.encode(), seq=seq, stream_id=f"{seq}-0".encode(),
                      ts_ns=time.time_ns(), model=b"t.row", pk=str(seq).encode(), fmt=b"xml",
                      payload=b"<row>security</row>")
    batch.add(Entry(f"{seq}-0".encode(), node, seq, time.time_ns(), part, b""))
    return batch


async def link_publish(settings: Settings, node: str, seq: int = 1) -> Reply:
    """Connect an XmppLink (the shard's), publish one batch the way the worker does."""
    iq_id = f"sec{seq}"
    answer: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
    link = XmppLink(settings, "security", lambda i: i == iq_id,
                    lambda r: None if answer.done() else answer.set_result(r), lambda: None)
    await link.connect(CONNECT_S)
    try:
        link.send(publish_iq(iq_id, settings.pubsub_service, one_entry_batch(node, seq),
                             link.publish_options))
        return await asyncio.wait_for(answer, CONNECT_S)
    finally:
        await link.close()


def ejabberdctl(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """ejabberdctl against the stack's node (as ops/stack runs it)."""
    etc = stack.state_dir / "ejabberd" / "etc"
    return subprocess.run(
        ["timeout", "60", "ejabberdctl", "--ctl-config", str(etc / "ejabberdctl.cfg"),
         "--config-dir", str(etc), "--config", str(etc / "ejabberd.yml"),
         "--spool", str(stack.state_dir / "ejabberd" / "spool"),
         "--logs", str(stack.state_dir / "ejabberd" / "log"),
         "--node", stack.control["SCALEPUB_EJABBERD_NODE"], *args],
        capture_output=True, text=True, timeout=90, check=False)


def register(stack: Stack, user: str) -> tuple[str, str]:
    """A new account on the publisher's domain (an operator's ``ejabberdctl register``)."""
    password = uuid.uuid4().hex
    done = ejabberdctl(stack, "register", user, stack.env["SCALEPUB_XMPP_DOMAIN"], password)
    assert done.returncode == 0, done.stdout + done.stderr
    return f"{user}@{stack.env['SCALEPUB_XMPP_DOMAIN']}", password


class Peer:
    """A plain slixmpp client (not scalepub's code), connected and ready for IQs."""

    def __init__(self, env: dict[str, str], jid: str, password: str = "") -> None:
        self.env = env
        self.client = slixmpp.ClientXMPP(jid, password)
        self.client.enable_starttls = self.client.enable_direct_tls = False
        self.client.enable_plaintext = True
        self.client["feature_mechanisms"].unencrypted_plain = True
        self.client.register_plugin("xep_0060")
        self.received: list[str] = []
        self.client.add_event_handler("pubsub_publish", self._on_publish)

    async def __aenter__(self) -> Peer:
        started = asyncio.get_running_loop().create_future()
        self.client.add_event_handler("session_start", lambda _e: started.set_result(None))
        self.client.add_event_handler(
            "failed_all_auth", lambda _e: started.set_exception(RuntimeError("auth failed")))
        self.client.connect(self.env["SCALEPUB_XMPP_HOST"], int(self.env["SCALEPUB_XMPP_PORT"]))
        await asyncio.wait_for(started, CONNECT_S)
        self.client.send_presence()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.client.disconnect(wait=1.0)

    @property
    def pubsub(self) -> Any:
        return self.client.plugin["xep_0060"]

    def _on_publish(self, msg: Any) -> None:
        payload = msg["pubsub_event"]["items"]["item"]["payload"]
        if payload is not None:
            self.received.append(payload.text or "")


async def refused(action: Any) -> str:
    """The error condition the server answers ``action`` with ('' if it was accepted)."""
    try:
        await action
    except IqError as exc:
        return str(exc.iq["error"]["condition"])
    except IqTimeout:
        return "timeout"
    return ""


# -- credentials never logged -------------------------------------------------------------

def secret_forms(jid: str, password: str) -> list[str]:
    """The password and the base64 forms SASL PLAIN would carry it in."""
    user = jid.partition("@")[0]
    raw = [password.encode(), b"\0" + user.encode() + b"\0" + password.encode(),
           b"\0" + jid.encode() + b"\0" + password.encode(),
           jid.encode() + b"\0" + user.encode() + b"\0" + password.encode()]
    return [password] + [base64.b64encode(r).decode() for r in raw]


def test_debug_log_of_a_publisher_session_has_no_password(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    settings = settings_of(stack)
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="slixmpp")
    reply = asyncio.run(link_publish(settings, f"/security/log/{settings.key_prefix}"))
    assert reply.ok, reply.reason
    text = caplog.text
    # The stanza log is there, PLAIN was used (plain TCP on loopback) and its value blanked.
    assert "SEND:" in text and 'mechanism="PLAIN"' in text, text[:2000]
    assert 'mechanism="PLAIN">***</auth>' in text
    for form in secret_forms(settings.xmpp_jid, settings.xmpp_password):
        assert form not in text


def test_debug_log_of_the_pool_has_no_password(stack: Stack, tmp_path: Path) -> None:
    settings = settings_of(stack)
    produce(settings, [f"/security/poollog/{settings.key_prefix}"], 5)
    pool = PoolProcess(settings, tmp_path / "pool.log", "--shards", "1", "--log-level", "DEBUG")
    try:
        assert wait_until(lambda: drained(settings), 60), pool.output()[-3000:]
        assert pool.stop() == exitcodes.OK
    finally:
        pool.kill()
    out = pool.output()
    assert "SEND:" in out and "<auth " in out and "***</auth>" in out
    for form in secret_forms(settings.xmpp_jid, settings.xmpp_password):
        assert form not in out
    assert repr(settings).count(settings.xmpp_password) == 0


# -- TLS ----------------------------------------------------------------------------------

def openssl(*args: str, cwd: Path) -> None:
    """The openssl CLI: Debian's ejabberd pre-depends on it, so the stack has it."""
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                          check=False, timeout=60)
    assert done.returncode == 0, done.stderr


def make_ca(d: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
            "-subj", f"/CN=scalepub test {name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def make_server_cert(d: Path, ca: str, names: list[str]) -> Path:
    """A certificate for ``names`` signed by ``ca``, with its key, in one PEM (ejabberd's)."""
    (d / "ext.cnf").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
        f"subjectAltName={','.join('DNS:' + n for n in names)}\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "server.key", "-out", "server.csr", "-subj", f"/CN={names[0]}", cwd=d)
    openssl("x509", "-req", "-in", "server.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)
    bundle = d / "xmpp.pem"
    bundle.write_text((d / "server.pem").read_text() + (d / "server.key").read_text())
    return bundle


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.pem (signed the server's certificate), other.pem (an unrelated CA), xmpp.pem."""
    d = tmp_path_factory.mktemp("tls")
    make_ca(d, "ca")
    make_ca(d, "other")
    # Valid for the publisher's domain and its pubsub service, NOT for anon.localhost.
    make_server_cert(d, "ca", ["localhost", "pubsub.localhost"])
    return d


@pytest.fixture(scope="module")
def tls_stack(certs: Path) -> Iterator[Stack]:
    """A stack whose ejabberd requires STARTTLS with the certificate above."""
    yield from running(SCALEPUB_XMPP_CERTFILE=str(certs / "xmpp.pem"))


def test_tls_stack_env_requires_tls(tls_stack: Stack) -> None:
    assert tls_stack.env["SCALEPUB_XMPP_TLS"] == "required"


def test_tls_with_the_ca_file_publishes(tls_stack: Stack, certs: Path) -> None:
    settings = settings_of(tls_stack, xmpp_ca_file=str(certs / "ca.pem"))
    reply = asyncio.run(link_publish(settings, f"/security/tls/{settings.key_prefix}"))
    assert reply.ok, reply.reason


def test_plain_tcp_is_refused_by_the_tls_server(tls_stack: Stack) -> None:
    # Shows the server really requires STARTTLS, so the test above published over TLS.
    settings = settings_of(tls_stack, xmpp_tls="off")
    started = time.monotonic()
    with pytest.raises(XmppTlsError, match="requires STARTTLS: set SCALEPUB_XMPP_TLS=required"):
        asyncio.run(link_publish(settings, "/security/plain"))
    assert time.monotonic() - started < CONNECT_S / 2  # said at once, not after a timeout


def test_a_certificate_from_another_ca_is_refused(tls_stack: Stack, certs: Path) -> None:
    settings = settings_of(tls_stack, xmpp_ca_file=str(certs / "other.pem"))
    with pytest.raises(XmppTlsError) as info:
        asyncio.run(link_publish(settings, "/security/wrongca"))
    message = str(info.value)
    assert "certificate refused" in message and "SCALEPUB_XMPP_CA_FILE" in message, message


def test_system_cas_do_not_trust_a_private_ca(tls_stack: Stack) -> None:
    settings = settings_of(tls_stack)  # no CA file: the system's store
    assert settings.xmpp_tls == "required" and not settings.xmpp_ca_file
    with pytest.raises(XmppTlsError, match="system's CAs"):
        asyncio.run(link_publish(settings, "/security/system"))


def test_a_certificate_for_another_name_is_refused(tls_stack: Stack, certs: Path) -> None:
    # The certificate names localhost; a publisher of anon.localhost expects that name.
    settings = settings_of(tls_stack, xmpp_ca_file=str(certs / "ca.pem"),
                           xmpp_jid=f"pub@{tls_stack.env['SCALEPUB_ANON_DOMAIN']}")
    with pytest.raises(XmppTlsError, match=r"(?i)hostname mismatch"):
        asyncio.run(link_publish(settings, "/security/name"))


def test_pool_with_the_wrong_ca_exits_with_the_xmpp_code(
        tls_stack: Stack, certs: Path, tmp_path: Path) -> None:
    settings = settings_of(tls_stack, xmpp_ca_file=str(certs / "other.pem"))
    pool = PoolProcess(settings, tmp_path / "pool.log", "--shards", "1")
    try:
        code = pool.proc.wait(60)
    finally:
        pool.kill()
    assert code == exitcodes.XMPP_UNREACHABLE, pool.output()[-3000:]
    assert "SCALEPUB_XMPP_CA_FILE" in pool.output()


def test_tail_with_the_wrong_ca_exits_with_the_xmpp_code(tls_stack: Stack, certs: Path) -> None:
    settings = settings_of(tls_stack, xmpp_ca_file=str(certs / "other.pem"))
    done = subprocess.run([str(Path(sys.executable).parent / "scalepub"), "tail", "--count", "1",
                           "/security/tail/wrongca"], env={**os.environ, **settings_env(settings)},
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == exitcodes.XMPP_UNREACHABLE, done.stdout + done.stderr
    assert "SCALEPUB_XMPP_CA_FILE" in done.stderr and "Traceback" not in done.stderr


def test_a_ca_file_that_is_not_one_is_a_bad_setting(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(SettingsError, match="SCALEPUB_XMPP_CA_FILE"):
        Settings.from_env({"SCALEPUB_XMPP_CA_FILE": str(tmp_path / "junk.pem")})


def test_auto_means_tls_outside_loopback() -> None:
    from scalepub.xmpp.link import tls_required

    assert not tls_required(Settings(xmpp_host="127.0.0.1"))
    assert not tls_required(Settings(xmpp_host="localhost"))
    assert tls_required(Settings(xmpp_host="xmpp.example.com"))
    assert tls_required(Settings(xmpp_host="10.0.0.5"))
    assert tls_required(Settings(xmpp_host="127.0.0.1", xmpp_tls="required"))
    assert not tls_required(Settings(xmpp_host="xmpp.example.com", xmpp_tls="off"))


def test_tail_over_tls_receives_and_refuses_a_wrong_name(tls_stack: Stack, certs: Path) -> None:
    settings = settings_of(tls_stack, xmpp_ca_file=str(certs / "ca.pem"))
    jid, password = register(tls_stack, f"tail{uuid.uuid4().hex[:6]}")
    node = f"/security/tail/{settings.key_prefix}"

    async def scenario() -> tuple[list[ReceivedEntry], BaseException | None]:
        got: list[ReceivedEntry] = []
        sub = Subscriber(settings, [node], got.append, jid=jid, password=password)
        task = asyncio.create_task(sub.run())
        assert (await link_publish(settings, node, 1)).ok  # creates the node
        for _ in range(100):
            if node in sub.subscribed:
                break
            await asyncio.sleep(0.1)
        assert (await link_publish(settings, node, 2)).ok
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.1)
        task.cancel()
        # Anonymous on anon.localhost: the certificate does not name that domain.
        anon = Subscriber(settings, [node], got.append)
        try:
            await asyncio.wait_for(anon.run(), CONNECT_S)
        except XmppTlsError as exc:
            return got, exc
        return got, None

    got, error = asyncio.run(scenario())
    # 1 may come too: ejabberd sends a node's last item to a new subscriber.
    assert 2 in [e.seq for e in got] and {e.seq for e in got} <= {1, 2}
    assert error is not None and "hostname mismatch" in str(error).lower(), error


# -- least privilege: subscribers subscribe, nothing else ---------------------------------

async def try_everything(peer: Peer, service: str, node: str, own_node: str) -> dict[str, str]:
    """Each thing a subscriber must not do, and the server's answer ('' = it worked)."""
    ps = peer.pubsub
    jid = peer.client.boundjid.bare
    answers = {"subscribe": await refused(
        ps.subscribe(service, node, subscribee=peer.client.boundjid.full))}
    item = slixmpp.ET.Element("{urn:scalepub:1}batch")
    answers["publish"] = await refused(ps.publish(service, node, payload=item))
    answers["create"] = await refused(ps.create_node(service, own_node))
    answers["publish (auto-create)"] = await refused(ps.publish(service, own_node + "x",
                                                                payload=item))
    answers["get configuration"] = await refused(ps.get_node_config(service, node))
    form = peer.client.plugin["xep_0004"].make_form(  # type: ignore[no-untyped-call]
        ftype="submit")  # slixmpp leaves make_form unannotated
    form.add_field(var="FORM_TYPE", ftype="hidden",
                   value="http://jabber.org/protocol/pubsub#node_config")
    form.add_field(var="pubsub#publish_model", value="open")
    answers["configure"] = await refused(ps.set_node_config(service, node, form))
    answers["retract"] = await refused(ps.retract(service, node, "1-1"))
    answers["purge"] = await refused(ps.purge(service, node))
    answers["set affiliations"] = await refused(
        ps.modify_affiliations(service, node, affiliations=[(jid, "publisher")]))
    answers["get subscriptions"] = await refused(ps.get_node_subscriptions(service, node))
    answers["delete"] = await refused(ps.delete_node(service, node))
    return answers


@pytest.mark.parametrize("who", ["anonymous", "registered"])
def test_subscribers_can_subscribe_but_change_nothing(stack: Stack, who: str) -> None:
    env = stack.env
    service = env["SCALEPUB_PUBSUB_SERVICE"]
    node = f"/security/acl/{who}/{uuid.uuid4().hex[:8]}"
    create_nodes(env, [node])
    jid, password = ((env["SCALEPUB_ANON_DOMAIN"], "") if who == "anonymous"
                     else register(stack, f"sub{uuid.uuid4().hex[:6]}"))
    settings = settings_of(stack)

    async def scenario() -> tuple[dict[str, str], list[str]]:
        async with Peer(env, jid, password) as peer:
            answers = await try_everything(peer, service, node, f"/security/own/{uuid.uuid4()}")
            assert (await link_publish(settings, node, 7)).ok  # the node is still there
            for _ in range(50):
                if peer.received:
                    break
                await asyncio.sleep(0.1)
            return answers, peer.received

    answers, received = asyncio.run(scenario())
    assert answers.pop("subscribe") == "", "a subscriber must be able to subscribe"
    accepted = [action for action, condition in answers.items() if not condition]
    assert accepted == [], f"{who} subscriber was allowed to: {accepted} ({answers})"
    assert len(received) == 1 and 'seq="7"' in received[0]


# -- access model -------------------------------------------------------------------------

def test_whitelist_nodes_admit_only_affiliated_subscribers(stack: Stack, tmp_path: Path) -> None:
    env = stack.env
    service = env["SCALEPUB_PUBSUB_SERVICE"]
    settings = settings_of(stack, node_access_model="whitelist")
    node = f"/security/whitelist/{settings.key_prefix}"
    member, member_pw = register(stack, f"alice{uuid.uuid4().hex[:6]}")
    stranger, stranger_pw = register(stack, f"bob{uuid.uuid4().hex[:6]}")
    produce(settings, [node], 1)  # the pool creates the node, with publish-options
    pool = PoolProcess(settings, tmp_path / "pool.log", "--shards", "1")
    try:
        assert wait_until(lambda: drained(settings), 60), pool.output()[-3000:]
        # What an operator runs (docs/security.md): the owner sets the affiliation.
        done = subprocess.run([str(Path(sys.executable).parent / "scalepub"), "authorize", node,
                               member], env={**os.environ, **settings_env(settings)},
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr

        async def scenario() -> tuple[str, str, str, Peer]:
            async with Peer(env, stranger, stranger_pw) as bob, \
                    Peer(env, env["SCALEPUB_ANON_DOMAIN"]) as anon, \
                    Peer(env, member, member_pw) as alice:
                subscribe = [refused(p.pubsub.subscribe(service, node,
                                                        subscribee=p.client.boundjid.full))
                             for p in (bob, anon, alice)]
                answers = [await s for s in subscribe]
                await asyncio.to_thread(produce, settings, [node], 3)
                for _ in range(100):
                    if "4" in [q for text in alice.received for q in _seqs(text)]:
                        break
                    await asyncio.sleep(0.1)
                await asyncio.sleep(0.5)
                assert not bob.received and not anon.received
                return answers[0], answers[1], answers[2], alice

        bob_answer, anon_answer, alice_answer, alice = asyncio.run(scenario())
    finally:
        pool.stop()
        pool.kill()
    assert bob_answer and anon_answer, (bob_answer, anon_answer)
    assert alice_answer == ""
    seqs = sorted({int(s) for text in alice.received for s in _seqs(text)})
    # 1 was published before she subscribed; ejabberd may send it as the node's last item.
    assert seqs in ([2, 3, 4], [1, 2, 3, 4]), seqs


def _seqs(fragment: str) -> list[str]:
    return re.findall(r'<entry node="[^"]*" seq="(\d+)"', fragment)


def test_open_nodes_get_no_publish_options() -> None:
    open_iq = publish_iq("1", "pubsub.localhost", one_entry_batch("/n"), b"")
    assert b"publish-options" not in open_iq
    from scalepub.xmpp.batch import publish_options

    assert b"<value>whitelist</value>" in publish_options("whitelist")


# -- the history endpoint -----------------------------------------------------------------

def only_public(request: HttpRequest, node: str) -> bool:
    """A HISTORY_ACCESS callable for the tests: /public/... for all, the rest with a token."""
    return node.startswith("/public/") or request.headers.get("X-Token") == "let-me-in"


def test_history_is_open_by_default_and_guarded_by_history_access(stack: Stack) -> None:
    base = {"REDIS_URL": stack.env["SCALEPUB_REDIS_URL"], "KEY_PREFIX": "h" + uuid.uuid4().hex[:8]}
    client = Client()
    with override_settings(SCALEPUB=base):
        assert client.get("/scalepub/history", {"node": "/private/a"}).status_code == 200
    guarded = {**base, "HISTORY_ACCESS": "tests.test_security.only_public"}
    with override_settings(SCALEPUB=guarded):
        assert client.get("/scalepub/history", {"node": "/private/a"}).status_code == 403
        assert client.get("/scalepub/history", {"node": "/public/a"}).status_code == 200
        assert client.get("/scalepub/history", {"node": "/private/a"},
                          headers={"X-Token": "let-me-in"}).status_code == 200
    with override_settings(SCALEPUB={**base, "HISTORY_ACCESS": "tests.nowhere.check"}), \
            pytest.raises(ImproperlyConfigured, match=r"SCALEPUB\['HISTORY_ACCESS'\]"):
        client.get("/scalepub/history", {"node": "/public/a"})


def test_redis_passwords_are_kept_out_of_messages() -> None:
    settings = Settings(redis_url="rediss://scalepub:s3cret@redis.example.com:6380/0")
    assert settings.redis_url_redacted == "rediss://scalepub:***@redis.example.com:6380/0"
    assert Settings(redis_url="redis://:s3cret@h/0").redis_url_redacted == "redis://:***@h/0"
    assert Settings().redis_url_redacted == Settings().redis_url
    assert "s3cret" not in repr(Settings(xmpp_password="s3cret"))


def test_in_band_registration_is_off(stack: Stack) -> None:
    """A raw XEP-0077 request before login, as any client on the network could send it."""
    env = stack.env
    user = f"newcomer{uuid.uuid4().hex[:6]}"
    with socket.create_connection((env["SCALEPUB_XMPP_HOST"],
                                   int(env["SCALEPUB_XMPP_PORT"])), timeout=CONNECT_S) as sock:
        sock.sendall(f"<?xml version='1.0'?><stream:stream to='{env['SCALEPUB_XMPP_DOMAIN']}' "
                     "xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
                     "version='1.0'>".encode())
        # ejabberd advertises iq-register whenever mod_register runs; the request is what counts.
        _read_until(sock, re.compile(rb"</stream:features>"))
        sock.sendall(f"<iq type='set' id='reg1'><query xmlns='jabber:iq:register'><username>"
                     f"{user}</username><password>pw</password></query></iq>".encode())
        reply = _read_until(sock, re.compile(rb"<iq[^>]*/>|</iq>"))
    assert b"type='error'" in reply or b'type="error"' in reply, reply
    assert re.search(rb"<(forbidden|not-allowed)\b", reply), reply


def _read_until(sock: socket.socket, end: re.Pattern[bytes]) -> bytes:
    data = b""
    while not end.search(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data
