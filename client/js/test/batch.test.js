import test from 'node:test';
import assert from 'node:assert/strict';
import { DOMParser } from '@xmldom/xmldom';
import { parseBatch, parseEntries, batchesOfMessage, entriesFromHistory } from '../src/batch.js';

const NODE = '/twitter/Tweet/alice';
const xmlPayload = (pk, text) =>
  `<django-objects version="1.0"><object model="twitter.tweet" pk="${pk}"><field name="text" type="TextField">${text}</field><field name="reply_to" rel="ManyToOneRel" to="twitter.tweet"><None></None></field></object></django-objects>`;

function message(batchInner) {
  const xml = `<message xmlns="jabber:client" from="pubsub.localhost" to="x@anon.localhost/r">
    <event xmlns="http://jabber.org/protocol/pubsub#event"><items node="${NODE}"><item id="7-8">
    <batch xmlns="urn:scalepub:1" node="${NODE}" first="7" last="8" count="2">${batchInner}</batch>
    </item></items></event></message>`;
  return new DOMParser().parseFromString(xml, 'text/xml').documentElement;
}

test('batch with CDATA: entries, attributes, xml payload and fields', () => {
  // The payload attribute contains "]]>", so the publisher must split the CDATA section.
  const e7 = `<entry node="${NODE}" seq="7" id="1795677271835-0" ts="1795677271835123456" model="twitter.tweet" pk="41" fmt="xml">${xmlPayload(41, 'a ]]&gt; b &lt;i&gt;')}</entry>`;
  const e8 = `<entry node="${NODE}" seq="8" id="1795677271835-1" ts="1795677271835999999" model="twitter.tweet" pk="42" fmt="xml">${xmlPayload(42, 'second')}</entry>`;
  const text = e7 + e8;
  const cut = text.indexOf(']]') + 2; // split "]]>" as "]]" | ">"
  const cdata = `<![CDATA[${text.slice(0, cut)}]]><![CDATA[${text.slice(cut)}]]>`;
  const msg = message(cdata);
  const batches = batchesOfMessage(msg);
  assert.equal(batches.length, 1);
  assert.equal(batches[0].node, NODE);
  const entries = parseBatch(batches[0].batch, DOMParser, 1795677271900);
  assert.equal(entries.length, 2);
  const [a, b] = entries;
  assert.equal(a.node, NODE);
  assert.equal(a.seq, 7);
  assert.equal(typeof a.seq, 'number');
  assert.equal(a.id, '1795677271835-0');
  assert.equal(a.ts, '1795677271835123456');
  assert.ok(Math.abs(a.latencyMs - (1795677271900 - 1795677271835.123456)) < 0.01, String(a.latencyMs));
  assert.equal(a.model, 'twitter.tweet');
  assert.equal(a.pk, '41');
  assert.equal(a.fmt, 'xml');
  assert.equal(a.element.localName, 'entry');
  assert.equal(a.payload.localName, 'django-objects');
  assert.deepEqual(a.fields, { text: 'a ]]> b <i>', reply_to: null });
  assert.equal(b.seq, 8);
  assert.equal(b.fields.text, 'second');
});

test('batch forwarded as escaped text parses the same', () => {
  const inner = `<entry node="${NODE}" seq="9" id="1-0" ts="1" model="twitter.tweet" pk="1" fmt="xml">${xmlPayload(1, 'x &amp; y')}</entry>`;
  const escaped = inner.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
  const [e] = parseBatch(batchesOfMessage(message(escaped))[0].batch, DOMParser);
  assert.equal(e.seq, 9);
  assert.equal(e.fields.text, 'x & y');
});

test('json fmt: escaped JSON text → parsed value, never evaluated', () => {
  const json = JSON.stringify([{ model: 'twitter.tweet', pk: 5, fields: { text: '<b>"hi" & ]]> bye</b>' } }]);
  const esc = json.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
  const [e] = parseEntries(`<entry node="${NODE}" seq="3" id="2-0" ts="5" model="twitter.tweet" pk="5" fmt="json">${esc}</entry>`, DOMParser);
  assert.equal(e.fmt, 'json');
  assert.deepEqual(e.payload, JSON.parse(json));
  assert.equal(e.fields.text, '<b>"hi" & ]]> bye</b>');
});

test('malformed batch text throws', () => {
  assert.throws(() => parseEntries('<entry seq="1"><unclosed></entry>', DOMParser));
});

test('history entries build the same entry objects as live ones', () => {
  const [x, j] = entriesFromHistory([
    { node: NODE, seq: 4, id: '3-0', ts: '10', model: 'twitter.tweet', pk: '4', fmt: 'xml', payload: xmlPayload(4, 'q &quot; &amp;') },
    { node: NODE, seq: 5, id: '3-1', ts: '11', model: 'twitter.tweet', pk: '5', fmt: 'json', payload: '[{"fields": {"text": "</entry><x>"}}]' },
  ], DOMParser);
  assert.equal(x.seq, 4);
  assert.equal(x.payload.localName, 'django-objects');
  assert.equal(x.fields.text, 'q " &');
  assert.equal(j.seq, 5);
  assert.equal(j.payload[0].fields.text, '</entry><x>');
});
