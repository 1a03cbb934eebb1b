// Per-node ordering, pure (no I/O, no timers): dedupe, gap detection, buffering until catch-up.
//
//   const o = new Orderer({ deliver, lost, request, since });
//   o.push(entry)                 live entry (any node)
//   o.tail(node)                  after (re)subscribing: ask for what was published after lastSeq
//   o.resolve(node, result)       answer to a request(node, after, to): {entries, lost, last_seq}
//   o.fail(node)                  the request could not be answered
//
// deliver(entry): called once per entry, in seq order per node, never twice for a seq.
// lost(node, fromSeq, toSeq): the inclusive seq range will never be delivered.
// request(node, after, to): fetch entries with seq > after (up to at least `to`, or all if to is
//   null); the owner answers with resolve() or fail(). If request is null (no history), gaps are
//   reported through lost() at once and skipped.

export class Orderer {
  constructor({ deliver, lost = () => {}, request = null, since = null } = {}) {
    this._deliver = deliver;
    this._lost = lost;
    this._request = request;
    this._nodes = new Map();
    if (since) for (const [node, seq] of Object.entries(since)) this._state(node).lastSeq = Number(seq);
  }

  _state(node) {
    let st = this._nodes.get(node);
    if (!st) {
      st = { lastSeq: null, buffer: [], pending: null, tailWanted: false };
      this._nodes.set(node, st);
    }
    return st;
  }

  lastSeq(node) {
    const st = this._nodes.get(node);
    return st ? st.lastSeq : null;
  }

  /** Seqs of node currently buffered (waiting for catch-up). */
  buffered(node) {
    const st = this._nodes.get(node);
    return st ? st.buffer.map((e) => e.seq) : [];
  }

  pending(node) {
    const st = this._nodes.get(node);
    return st && st.pending ? { ...st.pending } : null;
  }

  push(entry) {
    const st = this._state(entry.node);
    const seq = entry.seq;
    if (!Number.isSafeInteger(seq) || seq < 1) return false;
    if (st.lastSeq === null) {
      // First entry seen on this node: delivered as is.
      this._emit(st, entry);
      this._drain(entry.node, st, null);
      return true;
    }
    if (seq <= st.lastSeq) return false; // duplicate
    if (!this._buffer(st, entry)) return false; // duplicate of a buffered entry
    this._drain(entry.node, st, null);
    return true;
  }

  tail(node) {
    const st = this._state(node);
    if (st.lastSeq === null || !this._request) return false;
    if (st.pending) {
      st.tailWanted = true; // after the pending request is answered
      return false;
    }
    this._ask(node, st, null);
    return true;
  }

  resolve(node, result = {}) {
    const st = this._state(node);
    const req = st.pending;
    if (!req) return;
    st.pending = null;
    // Merge the answer into the buffer, then drain: a gap up to `covered` is known to be lost
    // (the history had no entry for it), a gap beyond it is asked for again.
    let covered = req.to === null ? req.after : req.to;
    let fresh = 0;
    for (const e of result.entries || []) {
      if (e.node != null && e.node !== node) continue;
      if (!Number.isSafeInteger(e.seq) || e.seq <= st.lastSeq) continue;
      fresh++;
      covered = Math.max(covered, e.seq);
      this._buffer(st, e);
    }
    // lost with nothing newer returned: every entry up to the node's newest seq is gone.
    if (result.lost && !fresh && Number.isSafeInteger(result.last_seq)) covered = Math.max(covered, result.last_seq);
    this._drain(node, st, covered);
    if (!st.pending && covered > st.lastSeq) this._skip(node, st, covered);
    this._tailIfWanted(node, st);
  }

  fail(node) {
    const st = this._state(node);
    if (!st.pending) return;
    st.pending = null;
    // Nothing could be fetched: every gap before a buffered entry is lost.
    this._drain(node, st, Infinity);
    this._tailIfWanted(node, st);
  }

  _tailIfWanted(node, st) {
    if (st.tailWanted && !st.pending) {
      st.tailWanted = false;
      this._ask(node, st, null);
    }
  }

  _emit(st, entry) {
    st.lastSeq = entry.seq;
    this._deliver(entry);
  }

  _skip(node, st, toSeq) {
    const from = st.lastSeq + 1;
    st.lastSeq = toSeq;
    this._lost(node, from, toSeq);
  }

  // Insert by seq; false if that seq is already buffered.
  _buffer(st, entry) {
    const buf = st.buffer;
    let lo = 0;
    let hi = buf.length;
    if (hi && buf[hi - 1].seq < entry.seq) lo = hi; // common case: append
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (buf[mid].seq < entry.seq) lo = mid + 1;
      else hi = mid;
    }
    if (lo < buf.length && buf[lo].seq === entry.seq) return false;
    buf.splice(lo, 0, entry);
    return true;
  }

  // Deliver buffered entries in order. A gap whose end is <= covered is lost (skipped); a gap
  // beyond it starts a catch-up request (or is skipped when there is no history).
  _drain(node, st, covered) {
    const buf = st.buffer;
    let i = 0;
    let askTo = null;
    while (i < buf.length) {
      const e = buf[i];
      if (e.seq <= st.lastSeq) { i++; continue; }
      if (e.seq === st.lastSeq + 1) { this._emit(st, e); i++; continue; }
      if (st.pending) break; // a request is in flight; wait for it
      if (!this._request || (covered !== null && e.seq - 1 <= covered)) {
        this._skip(node, st, e.seq - 1);
        continue;
      }
      if (covered !== null && covered > st.lastSeq) this._skip(node, st, covered);
      askTo = e.seq - 1;
      break;
    }
    if (i) buf.splice(0, i);
    if (askTo !== null) this._ask(node, st, askTo);
  }

  _ask(node, st, to) {
    st.pending = { after: st.lastSeq, to };
    this._request(node, st.lastSeq, to);
  }
}
