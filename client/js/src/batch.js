// Unpack scalepub batches (docs/protocol.md §3) into entry objects.
// Pure: needs only a DOMParser constructor (the browser's, or @xmldom/xmldom's in Node).
// Payloads are parsed as XML or JSON, never evaluated and never inserted as HTML.

export const NS_BATCH = 'urn:scalepub:1';

const ELEMENT_NODE = 1;

function elementChildren(el) {
  const out = [];
  for (let n = el.firstChild; n; n = n.nextSibling) if (n.nodeType === ELEMENT_NODE) out.push(n);
  return out;
}

function localName(el) {
  return el.localName || String(el.nodeName).replace(/^.*:/, '');
}

/** Parse an XML string; throws on malformed input (browser <parsererror> or xmldom errors). */
export function parseXml(text, DOMParserImpl) {
  const P = DOMParserImpl || globalThis.DOMParser;
  if (!P) throw new Error('scalepub: no DOMParser available (pass options.DOMParser)');
  let doc;
  const errors = [];
  try {
    // The options object is for @xmldom/xmldom (collect errors instead of logging); browsers ignore it.
    doc = new P({ onError: (level, msg) => { if (level !== 'warning') errors.push(msg); } })
      .parseFromString(text, 'text/xml');
  } catch (err) {
    throw new Error(`scalepub: malformed XML: ${err && err.message}`);
  }
  if (errors.length) throw new Error(`scalepub: malformed XML: ${errors[0]}`);
  const root = doc && doc.documentElement;
  if (!root || localName(root) === 'parsererror' ||
      (doc.getElementsByTagName && doc.getElementsByTagName('parsererror').length)) {
    throw new Error('scalepub: malformed XML');
  }
  return root;
}

/** {fieldName: text} from Django's XML serializer output (<field name=…>; <None/> → null). */
export function djangoFields(djangoObjects) {
  const fields = {};
  if (!djangoObjects) return fields;
  const objects = elementChildren(djangoObjects).filter((c) => localName(c) === 'object');
  const obj = objects[0];
  if (!obj) return fields;
  for (const f of elementChildren(obj)) {
    if (localName(f) !== 'field') continue;
    const kids = elementChildren(f);
    if (kids.length === 1 && localName(kids[0]) === 'None') fields[f.getAttribute('name')] = null;
    else fields[f.getAttribute('name')] = f.textContent;
  }
  return fields;
}

/** Build the entry object handed to event_cb from an <entry> Element. */
export function entryFromElement(el, now = Date.now()) {
  const attr = (name) => el.getAttribute(name);
  const ts = attr('ts') || '';
  const fmt = attr('fmt') || 'xml';
  const entry = {
    node: attr('node'),
    seq: Number(attr('seq')),
    id: attr('id'),
    ts,
    latencyMs: ts ? now - Number(ts) / 1e6 : NaN,
    model: attr('model'),
    pk: attr('pk'),
    fmt,
    element: el,
    payload: null,
    fields: {},
  };
  if (fmt === 'json') {
    try {
      entry.payload = JSON.parse(el.textContent);
    } catch (err) {
      entry.error = `invalid JSON payload: ${err.message}`;
    }
    const first = Array.isArray(entry.payload) ? entry.payload[0] : null;
    if (first && first.fields && typeof first.fields === 'object') entry.fields = { ...first.fields };
  } else {
    entry.payload = elementChildren(el)[0] || null;
    entry.fields = djangoFields(entry.payload);
  }
  return entry;
}

/** Parse the text of a <batch> (a sequence of <entry> elements) into entry objects. */
export function parseEntries(text, DOMParserImpl, now = Date.now()) {
  const root = parseXml(`<entries>${text}</entries>`, DOMParserImpl);
  return elementChildren(root)
    .filter((c) => localName(c) === 'entry')
    .map((c) => entryFromElement(c, now));
}

/** Unpack one <batch xmlns="urn:scalepub:1"> Element. Its text content is already CDATA-joined. */
export function parseBatch(batchEl, DOMParserImpl, now = Date.now()) {
  return parseEntries(batchEl.textContent || '', DOMParserImpl, now);
}

/**
 * All batches of a pubsub#event <message>: [{node, batch: Element}], in document order.
 * Looks at event/items/item/batch only.
 */
export function batchesOfMessage(message) {
  const out = [];
  for (const ev of elementChildren(message)) {
    if (localName(ev) !== 'event') continue;
    for (const items of elementChildren(ev)) {
      if (localName(items) !== 'items') continue;
      for (const item of elementChildren(items)) {
        if (localName(item) !== 'item') continue;
        for (const b of elementChildren(item)) {
          const ns = b.namespaceURI || b.getAttribute('xmlns');
          if (localName(b) === 'batch' && ns === NS_BATCH) out.push({ node: items.getAttribute('node'), batch: b });
        }
      }
    }
  }
  return out;
}

function escapeAttr(v) {
  return String(v).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

function escapeText(v) {
  return String(v).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

/** Serialize a history JSON entry back into the <entry> wire form (§3). */
export function historyEntryXml(h) {
  const attrs = ['node', 'seq', 'id', 'ts', 'model', 'pk', 'fmt']
    .filter((k) => h[k] !== undefined && h[k] !== null)
    .map((k) => `${k}="${escapeAttr(h[k])}"`)
    .join(' ');
  const fmt = h.fmt || 'xml';
  const payload = h.payload == null ? '' : String(h.payload);
  // xml payload is Django's serializer output: an element, embedded as is (it is parsed, not evaluated).
  return `<entry ${attrs}>${fmt === 'json' ? escapeText(payload) : payload}</entry>`;
}

/** Build entry objects from history JSON entries, exactly as from a live batch. */
// An entry whose payload does not parse is left out (it then shows up as a gap, reported as lost).
export function entriesFromHistory(list, DOMParserImpl, now = Date.now(), onError = null) {
  const out = [];
  for (const h of list || []) {
    try {
      out.push(...parseEntries(historyEntryXml(h), DOMParserImpl, now));
    } catch (err) {
      if (onError) onError(err, h);
    }
  }
  return out;
}
