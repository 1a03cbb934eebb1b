import test from 'node:test';
import assert from 'node:assert/strict';
import { DOMParser } from '@xmldom/xmldom';
import { Strophe } from 'strophe.js';
import { PubSubClient } from '../src/client.js';

const NODE = '/twitter/Tweet/alice';
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const xml = (s) => new DOMParser().parseFromString(s, 'text/xml').documentElement;

class FakeConn {
  constructor(service, opts) {
    this.service = service; this.opts = opts; this.sent = []; this.iqs = []; this.handlers = [];
    this.connected = false; this.disconnecting = false; this.jid = '';
  }
  connect(jid, pass, cb) { this.args = [jid, pass]; this.cb = cb; cb(Strophe.Status.CONNECTING); }
  up(jid = 'abc@anon.localhost/r1') { this.jid = jid; this.connected = true; this.cb(Strophe.Status.CONNECTED); }
  drop() { this.connected = false; this.cb(Strophe.Status.CONNFAIL, 'gone'); this.cb(Strophe.Status.DISCONNECTED); }
  addHandler(fn, ns, name) { this.handlers.push({ fn, ns, name }); }
  send(el) { this.sent.push(el); }
  sendIQ(el, ok, err) { this.iqs.push({ el, ok, err }); }
  disconnect() { this.connected = false; this.cb(Strophe.Status.DISCONNECTED); }
  deliver(msg) { for (const h of this.handlers) if (h.name === 'message') h.fn(msg); }
}

const errorIq = (cond) => xml(`<iq type="error" xmlns="jabber:client"><error type="cancel"><${cond} xmlns="urn:ietf:params:xml:ns:xmpp-stanzas"/></error></iq>`);
const batchMsg = (seqs, from = 'pubsub.localhost') => xml(`<message xmlns="jabber:client"${
  from === null ? '' : ` from="${from}"`}><event xmlns="http://jabber.org/protocol/pubsub#event"><items node="${NODE}"><item id="x"><batch xmlns="urn:scalepub:1" node="${NODE}"><![CDATA[${
  seqs.map((s) => `<entry node="${NODE}" seq="${s}" id="${s}-0" ts="1" model="m.m" pk="${s}" fmt="json">{"n": ${s}}</entry>`).join('')}]]></batch></item></items></event></message>`);

test('anonymous login, presence, subscribe, retry on item-not-found, events, reconnect + tail catch-up', async () => {
  const conns = [];
  const statuses = [];
  const events = [];
  const fetches = [];
  const lostRanges = [];
  const fakeFetch = async (url) => {
    fetches.push(url);
    const after = Number(new URL(url, 'http://x').searchParams.get('after'));
    const entries = [6, 7, 8, 9].filter((s) => s > after).map((s) => ({ node: NODE, seq: s, id: `${s}-0`, ts: '1', model: 'm.m', pk: String(s), fmt: 'json', payload: `{"n": ${s}}` }));
    return { ok: true, status: 200, json: async () => ({ node: NODE, entries, lost: false, last_seq: 9 }) };
  };
  const c = new PubSubClient({
    node: NODE, domain: 'anon.localhost', pubsub: 'pubsub.localhost', historyUrl: '/scalepub/history',
    Strophe, DOMParser, fetch: fakeFetch, subscribeRetryMs: 20, reconnect: { initialDelayMs: 10, maxDelayMs: 40 },
    connectionFactory: (service, opts) => { const f = new FakeConn(service, opts); conns.push(f); return f; },
    event_cb: (e) => events.push(e.seq), history_lost_cb: (...a) => lostRanges.push(a), status_cb: (s) => statuses.push(s),
  });
  assert.equal(conns.length, 1);
  const c1 = conns[0];
  assert.deepEqual(c1.args, ['anon.localhost', null]);
  assert.equal(c1.handlers[0].ns, 'http://jabber.org/protocol/pubsub#event');
  c1.up();
  assert.equal(c1.sent[0].nodeName, 'presence');
  assert.equal(c1.iqs.length, 1);
  const sub = Strophe.serialize(c1.iqs[0].el);
  const iq = xml(sub);
  assert.equal(iq.getAttribute('type'), 'set');
  assert.equal(iq.getAttribute('to'), 'pubsub.localhost');
  const ps = iq.firstChild;
  assert.equal(ps.localName, 'pubsub');
  assert.equal(ps.namespaceURI, 'http://jabber.org/protocol/pubsub');
  assert.equal(ps.firstChild.localName, 'subscribe');
  assert.equal(ps.firstChild.getAttribute('node'), NODE);
  assert.equal(ps.firstChild.getAttribute('jid'), 'abc@anon.localhost/r1');

  c1.iqs[0].err(errorIq('item-not-found'));
  assert.equal(c1.iqs.length, 1);
  await sleep(40);
  assert.equal(c1.iqs.length, 2, 'subscribe retried after item-not-found');
  c1.iqs[1].ok(xml('<iq type="result"/>'));
  assert.ok(statuses.includes('subscribed'));
  assert.equal(fetches.length, 0, 'no tail before any entry was seen');

  c1.deliver(batchMsg([3, 4]));
  c1.deliver(batchMsg([4, 5]));
  assert.deepEqual(events, [3, 4, 5]);

  c1.drop();
  assert.deepEqual(statuses.filter((s) => s === 'disconnected' || s === 'reconnecting'), ['disconnected', 'reconnecting']);
  await sleep(30);
  assert.equal(conns.length, 2, 'reconnected');
  const c2 = conns[1];
  c2.up('def@anon.localhost/r2');
  assert.match(Strophe.serialize(c2.iqs[0].el), /jid="def@anon.localhost\/r2"/);
  c2.deliver(batchMsg([9])); // live entry while disconnected gap not yet filled
  c2.iqs[0].ok(xml('<iq type="result"/>'));
  await sleep(10);
  // the live 9 opened a gap (5, 8]: fetched; the tail after subscribing asks after=9
  assert.deepEqual(fetches, ['/scalepub/history?node=%2Ftwitter%2FTweet%2Falice&after=5&limit=1000',
    '/scalepub/history?node=%2Ftwitter%2FTweet%2Falice&after=9&limit=1000']);
  assert.deepEqual(events, [3, 4, 5, 6, 7, 8, 9]);
  assert.deepEqual(lostRanges, []);
  // old connection's events are ignored
  c1.deliver(batchMsg([10]));
  assert.deepEqual(events, [3, 4, 5, 6, 7, 8, 9]);

  c.close();
  assert.equal(statuses.at(-1), 'closed');
  await sleep(60);
  assert.equal(conns.length, 2, 'no reconnect after close()');
});

test('reconnect: anywhere in a window of initialDelayMs (default 2 s) that doubles up to maxDelayMs', async () => {
  const realRandom = Math.random;
  const conns = [];
  const delays = [];
  const make = (reconnect) => new PubSubClient({
    node: NODE, Strophe, DOMParser, reconnect,
    connectionFactory: (s, o) => { const f = new FakeConn(s, o); conns.push(f); return f; },
    status_cb: (s, d) => { if (s === 'reconnecting') delays.push(d.delayMs); },
  });
  try {
    Math.random = () => 0.999; // the top of each window
    const c = make({ initialDelayMs: 8, maxDelayMs: 20 });
    for (let i = 0; i < 4; i++) { conns.at(-1).drop(); await sleep(30); }
    assert.deepEqual(delays, [8, 16, 20, 20], 'window doubles, capped at maxDelayMs');
    Math.random = () => 0; // the bottom: at once (no floor that bunches a storm together)
    conns.at(-1).up(); // a session resets the window
    conns.at(-1).drop();
    assert.equal(delays.at(-1), 0);
    await sleep(10);
    assert.equal(conns.length, 6, 'reconnected at once');
    c.close();
    Math.random = () => 0.999;
    const d = make(undefined);
    conns.at(-1).drop();
    assert.equal(delays.at(-1), 1998, 'default first window: 2 s');
    d.close();
  } finally {
    Math.random = realRandom;
  }
});

test('username/password login and websocket transport option', () => {
  let made;
  const c = new PubSubClient({
    nodes: ['/a', '/b'], username: 'bob@localhost', password: 's3cret', transport: 'websocket', service: 'ws://127.0.0.1:5280/ws',
    Strophe, DOMParser, connectionFactory: (s, o) => (made = new FakeConn(s, o)),
  });
  assert.deepEqual(made.args, ['bob@localhost', 's3cret']);
  assert.equal(made.opts.protocol, 'ws');
  made.up('bob@localhost/x');
  assert.equal(made.iqs.length, 2);
  made.iqs[0].ok(xml('<iq type="result"/>'));
  c.close();
  assert.equal(made.sent.filter((s) => /<unsubscribe [^>]*node="\/a"/.test(Strophe.serialize(s))).length, 1);
});

test('close() unsubscribes an anonymous session too (ejabberd keeps its subscriptions otherwise)', () => {
  let made;
  const c = new PubSubClient({
    nodes: ['/a', '/b'], Strophe, DOMParser, connectionFactory: (s, o) => (made = new FakeConn(s, o)),
  });
  made.up('123@anon.localhost/x');
  made.iqs[0].ok(xml('<iq type="result"/>'));
  c.close();
  const unsubs = made.sent.map((s) => Strophe.serialize(s)).filter((s) => /<unsubscribe /.test(s));
  assert.equal(unsubs.length, 1, 'only the node whose subscription was confirmed');
  assert.match(unsubs[0], /node="\/a"[^>]*jid="123@anon.localhost\/x"|jid="123@anon.localhost\/x"[^>]*node="\/a"/);
});

test('pubsub events are taken only from the pubsub service (bare JID, any case)', () => {
  let made;
  const events = [];
  const c = new PubSubClient({
    node: NODE, pubsub: 'PubSub.LocalHost', Strophe, DOMParser,
    connectionFactory: (s, o) => (made = new FakeConn(s, o)), event_cb: (e) => events.push(e.seq),
  });
  made.up();
  made.iqs[0].ok(xml('<iq type="result"/>'));
  // Forged: another user, the service's domain with a user part, a look-alike, no sender.
  for (const from of ['evil@anon.localhost/x', 'x@pubsub.localhost', 'pubsub.localhost.evil',
    'evil.pubsub.localhost', 'localhost', '', null]) made.deliver(batchMsg([1, 2, 1000], from));
  assert.deepEqual(events, []);
  assert.equal(c.ignoredEvents, 7);
  // The real ones: none taken for a duplicate of the forged seqs, none held back by seq 1000.
  made.deliver(batchMsg([1, 2]));
  made.deliver(batchMsg([3], 'PUBSUB.localhost'));
  made.deliver(batchMsg([4], 'pubsub.localhost/res'));
  assert.deepEqual(events, [1, 2, 3, 4]);
  assert.equal(c.ignoredEvents, 7);
  c.close();
});

test('bareJid and fromService', async () => {
  const { bareJid, fromService } = await import('../src/client.js');
  assert.equal(bareJid('A@B.C/Res/x'), 'a@b.c');
  assert.equal(bareJid(null), '');
  assert.ok(fromService(xml('<message from="pubsub.example.com"/>'), 'pubsub.example.com'));
  assert.ok(!fromService(xml('<message/>'), 'pubsub.example.com'));
  assert.ok(!fromService(xml('<message from="pubsub.example.com"/>'), ''));
});
