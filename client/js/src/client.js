// Connection, login, subscribe, reconnect. Strophe is injected (index.js sets the default) so
// the logic can be tested with a fake connection.

import { batchesOfMessage, parseBatch } from './batch.js';
import { Orderer } from './order.js';
import { fetchRange } from './history.js';
import { invalidNodeReason } from './nodes.js';

export const NS_PUBSUB = 'http://jabber.org/protocol/pubsub';
export const NS_PUBSUB_EVENT = 'http://jabber.org/protocol/pubsub#event';
export const NS_STANZAS = 'urn:ietf:params:xml:ns:xmpp-stanzas';

const SUBSCRIBE_RETRY_MS = 2000;

/** A JID without its resource, lower-cased: domains and localparts compare case-insensitively. */
export function bareJid(jid) {
  return String(jid || '').split('/')[0].toLowerCase();
}

/**
 * Whether a pubsub event message comes from the pubsub service. Anyone who can log in may
 * send a <message> with a pubsub event to a subscriber's full JID; the server stamps `from` on
 * what its users send, so only the service itself can send from its address.
 */
export function fromService(msg, pubsub) {
  const from = msg && msg.getAttribute && msg.getAttribute('from');
  return Boolean(from) && bareJid(from) === bareJid(pubsub);
}
const HISTORY_RETRIES = 3;

function errorCondition(stanza) {
  if (!stanza) return 'timeout';
  const errs = stanza.getElementsByTagName('error');
  const err = errs && errs[0];
  if (!err) return 'unknown';
  for (let n = err.firstChild; n; n = n.nextSibling) {
    if (n.nodeType === 1 && (n.namespaceURI === NS_STANZAS || n.getAttribute('xmlns') === NS_STANZAS)) {
      return n.localName || n.nodeName;
    }
  }
  return 'unknown';
}

export class PubSubClient {
  /** Default Strophe namespace object; set by index.js. Override per client with options.Strophe. */
  static Strophe = null;

  constructor(options = {}) {
    const o = { ...options };
    this.nodes = o.nodes ? [...o.nodes] : (o.node ? [o.node] : []);
    if (!this.nodes.length) throw new Error('scalepub: node or nodes is required');
    for (const node of this.nodes) {
      const why = invalidNodeReason(node);
      if (why) throw new Error(`scalepub: invalid node name ${JSON.stringify(node)}: ${why}`);
    }
    this.options = o;
    this.Strophe = o.Strophe || PubSubClient.Strophe;
    if (!this.Strophe) throw new Error('scalepub: Strophe is not available');
    this._DOMParser = o.DOMParser || globalThis.DOMParser;
    this._fetch = o.fetch || (globalThis.fetch && globalThis.fetch.bind(globalThis));
    this._event_cb = o.event_cb || (() => {});
    this._status_cb = o.status_cb || (() => {});
    this._lost_cb = o.history_lost_cb || (() => {});
    // initialDelayMs is the first reconnect's window (see _scheduleReconnect) and the first
    // history retry's delay.
    this._reconnect = { initialDelayMs: 2000, maxDelayMs: 10000, ...(o.reconnect || {}) };
    this._subscribeRetryMs = o.subscribeRetryMs ?? SUBSCRIBE_RETRY_MS;
    this._service = o.service || 'http://127.0.0.1:5280/bosh';
    this._pubsub = o.pubsub || 'pubsub.localhost';
    this.ignoredEvents = 0; // pubsub event messages not from the pubsub service, dropped
    this._closed = false;
    this._conn = null;
    this._attempt = 0;
    this._timers = new Set();
    this._subscribed = new Set();
    this._gen = 0; // connection generation: callbacks of an older connection are ignored
    this._order = new Orderer({
      deliver: (e) => this._deliver(e),
      lost: (node, from, to) => this._lost(node, from, to),
      request: o.historyUrl ? (node, after, to) => this._catchup(node, after, to) : null,
      since: o.since || null,
    });
    if (o.autoConnect !== false) this.connect();
  }

  /** The last delivered seq per node (pass it back as options.since to resume). */
  positions() {
    const out = {};
    for (const n of this.nodes) {
      const s = this._order.lastSeq(n);
      if (s !== null) out[n] = s;
    }
    return out;
  }

  get connection() { return this._conn; }

  connect() {
    if (this._closed) return;
    const S = this.Strophe;
    const gen = ++this._gen;
    this._subscribed.clear();
    const connOpts = { ...(this.options.connectionOptions || {}) };
    if (this.options.transport === 'websocket') connOpts.protocol = connOpts.protocol || 'ws';
    const conn = this.options.connectionFactory
      ? this.options.connectionFactory(this._service, connOpts)
      : new S.Connection(this._service, connOpts);
    this._conn = conn;
    this._dropped = false;
    conn.addHandler((msg) => { if (gen === this._gen) this._onMessage(msg); return true; }, NS_PUBSUB_EVENT, 'message');
    const { username, password } = this.options;
    const jid = username || this.options.domain || 'anon.localhost';
    // No node in the JID and no password: Strophe picks SASL ANONYMOUS.
    conn.connect(jid, username ? password : null, (status, cond) => this._onStatus(gen, conn, status, cond));
  }

  close() {
    if (this._closed) return;
    this._closed = true;
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
    const conn = this._conn;
    if (conn && conn.connected && !conn.disconnecting) {
      // Drop our subscriptions, anonymous ones too: ejabberd 23.01 keeps a full JID's
      // subscription after its session ends, and every later publish to the node is routed
      // to it (docs/benchmarks.md, reconnect storm). Only a clean close can do this.
      for (const node of this._subscribed) conn.send(this._subscribeIq(conn, 'unsubscribe', node));
      conn.disconnect('closed');
    } else {
      this._gen++;
      this._status('closed');
    }
  }

  _status(status, detail) {
    try { this._status_cb(status, detail); } catch (err) { console.error('scalepub status_cb', err); }
  }

  _timer(fn, ms) {
    const t = setTimeout(() => { this._timers.delete(t); fn(); }, ms);
    this._timers.add(t);
    return t;
  }

  _onStatus(gen, conn, status, cond) {
    if (gen !== this._gen) return;
    const St = this.Strophe.Status;
    switch (status) {
      case St.CONNECTING:
        this._status('connecting', this._service);
        break;
      case St.CONNECTED:
        this._attempt = 0;
        this._status('connected', conn.jid);
        conn.send(new this.Strophe.Builder('presence').tree());
        for (const node of this.nodes) this._subscribe(gen, conn, node);
        break;
      case St.AUTHFAIL:
        // Wrong credentials do not heal by retrying: report and stop.
        this._status('error', { condition: 'auth-failed', detail: cond });
        this._closed = true;
        this._gen++;
        conn.disconnect('auth-failed');
        this._status('closed');
        break;
      case St.CONNFAIL:
      case St.CONNTIMEOUT:
      case St.ERROR:
      case St.DISCONNECTED:
        if (this._closed) {
          if (status === St.DISCONNECTED) { this._gen++; this._status('closed'); }
          break;
        }
        if (this._dropped) break;
        this._dropped = true;
        this._status('disconnected', cond || null);
        this._scheduleReconnect();
        break;
      default:
        break;
    }
  }

  _scheduleReconnect() {
    const { initialDelayMs, maxDelayMs } = this._reconnect;
    const base = Math.min(maxDelayMs, initialDelayMs * 2 ** this._attempt);
    // Full jitter (anywhere in 0-100 % of the window): when the server drops every session at
    // once (a restart, a deploy), its clients come back spread over the whole first window
    // (500 in 2 s: ~250 logins/s) instead of all within 250-500 ms, as 50-100 % of 500 ms did
    // (~2000/s); docs/benchmarks.md, reconnect storm.
    const delay = Math.round(Math.random() * base);
    this._attempt++;
    this._gen++; // ignore whatever the old connection still reports
    const old = this._conn;
    try { if (old && old.connected) old.disconnect('reconnecting'); } catch { /* already gone */ }
    this._status('reconnecting', { attempt: this._attempt, delayMs: delay });
    this._timer(() => this.connect(), delay);
  }

  _subscribeIq(conn, verb, node) {
    return new this.Strophe.Builder('iq', { type: 'set', to: this._pubsub })
      .c('pubsub', { xmlns: NS_PUBSUB })
      .c(verb, { node, jid: conn.jid })
      .tree();
  }

  _subscribe(gen, conn, node) {
    if (gen !== this._gen || this._closed) return;
    conn.sendIQ(
      this._subscribeIq(conn, 'subscribe', node),
      () => {
        if (gen !== this._gen) return;
        this._subscribed.add(node);
        this._status('subscribed', node);
        this._order.tail(node); // entries published while we were away (or since options.since)
      },
      (stanza) => {
        if (gen !== this._gen) return;
        const condition = errorCondition(stanza);
        // item-not-found: the publisher creates the node on first publish; wait for it.
        if (condition !== 'item-not-found') this._status('error', { node, condition });
        const delay = condition === 'item-not-found' ? this._subscribeRetryMs
          : Math.max(this._subscribeRetryMs, this._reconnect.maxDelayMs);
        this._timer(() => this._subscribe(gen, conn, node), delay);
      },
      this.options.iqTimeoutMs ?? 20000,
    );
  }

  _onMessage(msg) {
    if (!fromService(msg, this._pubsub)) {
      // Forged: its entries would be shown, and its seqs would hide the real ones as duplicates.
      this.ignoredEvents++;
      return;
    }
    for (const { batch } of batchesOfMessage(msg)) {
      let entries;
      try {
        entries = parseBatch(batch, this._DOMParser);
      } catch (err) {
        this._status('error', { condition: 'bad-batch', error: err });
        continue;
      }
      for (const e of entries) if (this.nodes.includes(e.node)) this._order.push(e);
    }
  }

  _deliver(entry) {
    try { this._event_cb(entry); } catch (err) { this._status('error', { condition: 'event_cb', error: err }); }
  }

  _lost(node, from, to) {
    try { this._lost_cb(node, from, to); } catch (err) { console.error('scalepub history_lost_cb', err); }
  }

  _catchup(node, after, to, attempt = 0) {
    if (this._closed) return;
    fetchRange({
      url: this.options.historyUrl, node, after, to, limit: this.options.historyLimit || 1000,
      fetch: this._fetch, fetchOptions: this.options.historyFetchOptions, DOMParser: this._DOMParser,
      onError: (error, raw) => this._status('error', { condition: 'bad-history-entry', node, seq: raw && raw.seq, error }),
    }).then(
      (res) => { if (!this._closed) this._order.resolve(node, res); },
      (error) => {
        if (this._closed) return;
        if (attempt + 1 < HISTORY_RETRIES) {
          this._timer(() => this._catchup(node, after, to, attempt + 1), this._reconnect.initialDelayMs * 2 ** attempt);
        } else {
          this._status('error', { condition: 'history-failed', node, error });
          this._order.fail(node);
        }
      },
    );
  }
}
