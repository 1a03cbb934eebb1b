import test from 'node:test';
import assert from 'node:assert/strict';
import { Orderer } from '../src/order.js';

const N = '/a/B';
const e = (seq, node = N) => ({ node, seq, id: `id-${seq}` });

function harness(opts = {}) {
  const out = [];
  const lost = [];
  const requests = [];
  const o = new Orderer({
    deliver: (x) => out.push(`${x.node}#${x.seq}`),
    lost: (node, from, to) => lost.push([node, from, to]),
    request: opts.noHistory ? null : (node, after, to) => requests.push([node, after, to]),
    since: opts.since,
  });
  const seqs = (node = N) => out.filter((s) => s.startsWith(`${node}#`)).map((s) => Number(s.split('#')[1]));
  return { o, out, lost, requests, seqs };
}

test('in order, first entry delivered as is, duplicates dropped', () => {
  const h = harness();
  for (const s of [5, 6, 6, 7, 5, 8, 7]) h.o.push(e(s));
  assert.deepEqual(h.seqs(), [5, 6, 7, 8]);
  assert.deepEqual(h.requests, []);
  assert.deepEqual(h.lost, []);
  assert.equal(h.o.lastSeq(N), 8);
});

test('nodes are independent', () => {
  const h = harness();
  h.o.push(e(1, '/x')); h.o.push(e(10, '/y')); h.o.push(e(2, '/x')); h.o.push(e(11, '/y'));
  assert.deepEqual(h.seqs('/x'), [1, 2]);
  assert.deepEqual(h.seqs('/y'), [10, 11]);
});

test('gap → catch-up request → delivered in order, then the buffer', () => {
  const h = harness();
  h.o.push(e(1)); h.o.push(e(2));
  h.o.push(e(5)); // gap 3..4
  assert.deepEqual(h.requests, [[N, 2, 4]]);
  h.o.push(e(6)); h.o.push(e(5)); // buffered, dup in buffer ignored
  assert.deepEqual(h.seqs(), [1, 2]);
  assert.deepEqual(h.o.buffered(N), [5, 6]);
  h.o.resolve(N, { entries: [e(3), e(4), e(5)], lost: false, last_seq: 6 });
  assert.deepEqual(h.seqs(), [1, 2, 3, 4, 5, 6]);
  assert.deepEqual(h.lost, []);
  h.o.push(e(7)); h.o.push(e(4));
  assert.deepEqual(h.seqs(), [1, 2, 3, 4, 5, 6, 7]);
  assert.equal(h.requests.length, 1);
});

test('lost → callback, skip ahead, buffer flushed', () => {
  const h = harness();
  h.o.push(e(10));
  h.o.push(e(20)); h.o.push(e(21));
  assert.deepEqual(h.requests, [[N, 10, 19]]);
  h.o.resolve(N, { entries: [e(15), e(16), e(17), e(18), e(19)], lost: true, last_seq: 21 });
  assert.deepEqual(h.lost, [[N, 11, 14]]);
  assert.deepEqual(h.seqs(), [10, 15, 16, 17, 18, 19, 20, 21]);
});

test('lost with nothing returned: the whole gap is reported', () => {
  const h = harness();
  h.o.push(e(1)); h.o.push(e(9));
  h.o.resolve(N, { entries: [], lost: true, last_seq: 9 });
  assert.deepEqual(h.lost, [[N, 2, 8]]);
  assert.deepEqual(h.seqs(), [1, 9]);
});

test('history without the entries (dead-lettered) → reported lost, never silently skipped', () => {
  const h = harness();
  h.o.push(e(1)); h.o.push(e(4));
  h.o.resolve(N, { entries: [e(3)], lost: false, last_seq: 4 });
  assert.deepEqual(h.lost, [[N, 2, 2]]);
  assert.deepEqual(h.seqs(), [1, 3, 4]);
});

test('no history configured: gap reported and skipped at once', () => {
  const h = harness({ noHistory: true });
  h.o.push(e(1)); h.o.push(e(4)); h.o.push(e(5));
  assert.deepEqual(h.lost, [[N, 2, 3]]);
  assert.deepEqual(h.seqs(), [1, 4, 5]);
});

test('failed catch-up: gap reported lost, buffer delivered', () => {
  const h = harness();
  h.o.push(e(1)); h.o.push(e(4));
  h.o.fail(N);
  assert.deepEqual(h.lost, [[N, 2, 3]]);
  assert.deepEqual(h.seqs(), [1, 4]);
});

test('tail catch-up after reconnect; live entries meanwhile deduped and kept in order', () => {
  const h = harness();
  h.o.push(e(1)); h.o.push(e(2));
  assert.equal(h.o.tail(N), true);
  assert.deepEqual(h.requests, [[N, 2, null]]);
  h.o.push(e(6)); h.o.push(e(7)); // live, after reconnect
  assert.deepEqual(h.seqs(), [1, 2]);
  h.o.resolve(N, { entries: [e(3), e(4), e(5), e(6)], lost: false, last_seq: 6 });
  assert.deepEqual(h.seqs(), [1, 2, 3, 4, 5, 6, 7]);
  assert.deepEqual(h.lost, []);
});

test('tail with a further gap before the live entries asks again', () => {
  const h = harness();
  h.o.push(e(1));
  h.o.tail(N);
  h.o.push(e(9));
  h.o.resolve(N, { entries: [e(2), e(3)], lost: false, last_seq: 3 });
  assert.deepEqual(h.seqs(), [1, 2, 3]);
  assert.deepEqual(h.requests, [[N, 1, null], [N, 3, 8]]);
  h.o.resolve(N, { entries: [e(4), e(5), e(6), e(7), e(8)], lost: false, last_seq: 9 });
  assert.deepEqual(h.seqs(), [1, 2, 3, 4, 5, 6, 7, 8, 9]);
});

test('since: resume position; first live entry after it is a gap', () => {
  const h = harness({ since: { [N]: 41 } });
  assert.equal(h.o.tail(N), true);
  assert.deepEqual(h.requests, [[N, 41, null]]);
  h.o.resolve(N, { entries: [e(42), e(43)], lost: false, last_seq: 43 });
  h.o.push(e(43)); h.o.push(e(44));
  assert.deepEqual(h.seqs(), [42, 43, 44]);
});

test('tail requested while a gap request is pending runs afterwards', () => {
  const h = harness();
  h.o.push(e(1)); h.o.push(e(3));
  assert.equal(h.o.tail(N), false);
  h.o.resolve(N, { entries: [e(2)], lost: false });
  assert.deepEqual(h.seqs(), [1, 2, 3]);
  assert.deepEqual(h.requests, [[N, 1, 2], [N, 3, null]]);
});
