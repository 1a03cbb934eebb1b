// Node names from user data (docs/protocol.md "Node names"): the readable name is the node id.
// The client takes it as given, Strophe escapes it in the subscribe IQ, the batch's escaped
// attributes come back as the same string, and the history URL carries it percent-encoded.
import test from 'node:test';
import assert from 'node:assert/strict';
import { DOMParser } from '@xmldom/xmldom';
import { Strophe } from 'strophe.js';
import { PubSubClient } from '../src/client.js';
import { historyRequestUrl } from '../src/history.js';

const NAMES = ['/twitter/Tweet/José Ñ', '/twitter/Tweet/mary jane', '/a/b&c <d> "e" \'f\'', '/a/100% a%2Fb+c', '/a/😀 日本語'];
const xml = (s) => new DOMParser().parseFromString(s, 'text/xml').documentElement;
// What the shard writes (scalepub/xmpp/batch.py): &, < and " escaped in attributes.
const attr = (s) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/"/g, '&quot;');
const batchMsg = (node, seq) => xml(`<message xmlns="jabber:client" from="pubsub.localhost"><event xmlns="http://jabber.org/protocol/pubsub#event"><items node="${attr(node)}"><item id="${seq}"><batch xmlns="urn:scalepub:1" node="${attr(node)}" first="${seq}" last="${seq}" count="1"><![CDATA[<entry node="${attr(node)}" seq="${seq}" id="${seq}-0" ts="1" model="m.m" pk="1" fmt="json">{"n": ${seq}}</entry>]]></batch></item></items></event></message>`);

class FakeConn {
  constructor() { this.iqs = []; this.handlers = []; this.jid = ''; }
  connect(jid, pass, cb) { this.cb = cb; }
  up() { this.jid = 'abc@anon.localhost/r1'; this.cb(Strophe.Status.CONNECTED); }
  addHandler(fn, ns, name) { this.handlers.push({ fn, name }); }
  send() {}
  sendIQ(el, ok) { this.iqs.push({ el, ok }); }
  disconnect() {}
  deliver(msg) { for (const h of this.handlers) if (h.name === 'message') h.fn(msg); }
}

test('readable node names: subscribe IQ, received entries, history URL', () => {
  const conns = [];
  const got = [];
  const c = new PubSubClient({
    nodes: NAMES, domain: 'anon.localhost', Strophe, DOMParser,
    connectionFactory: () => { const f = new FakeConn(); conns.push(f); return f; },
    event_cb: (e) => got.push([e.node, e.seq]),
  });
  const conn = conns[0];
  conn.up();
  const subscribed = conn.iqs.map(({ el }) => xml(Strophe.serialize(el)).firstChild.firstChild.getAttribute('node'));
  assert.deepEqual(subscribed, NAMES, 'each name, exactly, in a well-formed subscribe IQ');
  for (const { ok } of conn.iqs) ok(xml('<iq type="result"/>'));
  for (const node of NAMES) conn.deliver(batchMsg(node, 1));
  conn.deliver(batchMsg('/twitter/Tweet/José', 1)); // another node: not subscribed, not shown
  assert.deepEqual(got, NAMES.map((n) => [n, 1]));
  for (const node of NAMES) {
    const url = new URL(historyRequestUrl('/scalepub/history', node, 0, 10), 'http://x');
    assert.equal(url.searchParams.get('node'), node);
  }
  c.close();
});

test('names that cannot work are refused at construction, saying why (same rule as validate_node)', () => {
  const make = (node) => () => new PubSubClient({ nodes: [node], Strophe, DOMParser, autoConnect: false });
  for (const [node, why] of [
    ['', 'must start with /'], ['/', 'must start with /'], ['twitter/Tweet', 'must start with /'],
    ['/a/b\n', 'U+000A at position 4'], ['/a\tb', 'U+0009'], ['/a\x7f', 'U+007F'], ['/a\x85', 'U+0085'],
    ['/a\u2028', 'U+2028'], ['/a\ud800', 'U+D800'], ['/a\ufffe', 'U+FFFE'], ['/a\u{10ffff}', 'U+10FFFF'],
    ['/' + 'a'.repeat(255), '256 bytes of UTF-8, more than 255'], ['/' + 'é'.repeat(128), '257 bytes'],
    [42, 'must be a string, got number'],
  ]) {
    assert.throws(make(node), (err) => err.message.startsWith('scalepub: invalid node name') && err.message.includes(why), JSON.stringify(node));
  }
  for (const node of [...NAMES, '/a/😀', '/' + 'é'.repeat(127), '/a//b/', '/a/x\u200dy\ufeff']) {
    assert.doesNotThrow(make(node), node);
  }
});
