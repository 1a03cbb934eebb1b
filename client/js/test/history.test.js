import test from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { DOMParser } from '@xmldom/xmldom';
import { fetchRange, historyRequestUrl } from '../src/history.js';

const NODE = '/twitter/Tweet/al+ice';
const payload = (i) => `<django-objects version="1.0"><object model="twitter.tweet" pk="${i}"><field name="text" type="TextField">t${i} &amp; &lt;b&gt;</field></object></django-objects>`;
const STORE = Array.from({ length: 25 }, (_, k) => k + 6).map((seq) => ({
  node: NODE, seq, id: `${seq}-0`, ts: String(BigInt(Date.now()) * 1000000n), model: 'twitter.tweet', pk: String(seq), fmt: 'xml', payload: payload(seq),
}));

function serve() {
  const seen = [];
  const server = http.createServer((req, res) => {
    const u = new URL(req.url, 'http://x');
    seen.push({ path: u.pathname, node: u.searchParams.get('node'), after: Number(u.searchParams.get('after')), limit: Number(u.searchParams.get('limit')) });
    if (u.searchParams.get('node') !== NODE) { res.writeHead(404); res.end(); return; }
    const after = Number(u.searchParams.get('after'));
    const limit = Number(u.searchParams.get('limit'));
    const entries = STORE.filter((e) => e.seq > after).slice(0, limit);
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ node: NODE, entries, lost: after < 5, last_seq: 30 }));
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({ server, seen, url: `http://127.0.0.1:${server.address().port}/scalepub/history` })));
}

test('request URL encodes the node', () => {
  assert.equal(historyRequestUrl('/h', '/a/b+c', 3, 1000), '/h?node=%2Fa%2Fb%2Bc&after=3&limit=1000');
  assert.equal(historyRequestUrl('/h?x=1', '/a', 0, 10), '/h?x=1&node=%2Fa&after=0&limit=10');
});

test('fetchRange pages until `to`, builds entry objects, reports lost', async () => {
  const { server, seen, url } = await serve();
  try {
    const r = await fetchRange({ url, node: NODE, after: 2, to: 22, limit: 7, DOMParser });
    assert.equal(r.lost, true);
    assert.equal(r.last_seq, 30);
    assert.deepEqual(seen.map((s) => s.after), [2, 12, 19]);
    assert.ok(seen.every((s) => s.node === NODE && s.limit === 7 && s.path === '/scalepub/history'));
    assert.deepEqual(r.entries.map((e) => e.seq), Array.from({ length: 21 }, (_, k) => k + 6));
    const e = r.entries[0];
    assert.equal(e.node, NODE);
    assert.equal(e.payload.localName, 'django-objects');
    assert.equal(e.fields.text, 't6 & <b>');
    assert.ok(e.latencyMs >= 0 && e.latencyMs < 60000);

    seen.length = 0;
    const tail = await fetchRange({ url, node: NODE, after: 20, to: null, limit: 7, DOMParser });
    assert.equal(tail.lost, false);
    assert.deepEqual(tail.entries.map((x) => x.seq), [21, 22, 23, 24, 25, 26, 27, 28, 29, 30]);
    assert.deepEqual(seen.map((s) => s.after), [20, 27]);

    await assert.rejects(fetchRange({ url, node: '/other', after: 0, DOMParser }), /HTTP 404/);
  } finally {
    server.close();
  }
});
