// HTTP catch-up: GET {url}?node=…&after=…&limit=… →
//   {"node", "entries": [{node, seq, id, ts, model, pk, fmt, payload}], "lost", "last_seq"}

import { entriesFromHistory } from './batch.js';

export function historyRequestUrl(url, node, after, limit) {
  const q = new URLSearchParams({ node, after: String(after), limit: String(limit) });
  return url + (url.includes('?') ? '&' : '?') + q.toString();
}

/** One page, raw JSON. */
export async function fetchHistoryPage({ url, node, after, limit = 1000, fetch: fetchImpl, fetchOptions }) {
  const f = fetchImpl || globalThis.fetch;
  const res = await f(historyRequestUrl(url, node, after, limit), {
    headers: { Accept: 'application/json' },
    ...(fetchOptions || {}),
  });
  if (!res.ok) throw new Error(`scalepub history: HTTP ${res.status} for node ${node}`);
  const body = await res.json();
  if (!body || !Array.isArray(body.entries)) throw new Error('scalepub history: malformed answer');
  return body;
}

/**
 * Entries of node with seq > after, page by page, until `to` is reached (or everything, if to
 * is null) or the history has no more. Returns {entries (entry objects), lost, last_seq}.
 */
export async function fetchRange({ url, node, after, to = null, limit = 1000, fetch, fetchOptions,
  DOMParser, maxPages = 100, onError }) {
  const entries = [];
  let lost = false;
  let lastSeq = null;
  let cursor = after;
  for (let page = 0; page < maxPages; page++) {
    const body = await fetchHistoryPage({ url, node, after: cursor, limit, fetch, fetchOptions });
    lost = lost || !!body.lost;
    if (Number.isSafeInteger(body.last_seq)) lastSeq = body.last_seq;
    const got = entriesFromHistory(body.entries.filter((e) => Number(e.seq) > cursor), DOMParser, Date.now(), onError);
    entries.push(...got);
    const maxSeq = body.entries.reduce((m, e) => Math.max(m, Number(e.seq) || 0), cursor);
    if (body.entries.length < limit || maxSeq <= cursor) break;
    if (to !== null && maxSeq >= to) break;
    cursor = maxSeq;
  }
  return { entries, lost, last_seq: lastSeq };
}
